"""`hwprune` console script: one Typer app; offline commands and service commands live in their own modules."""

from __future__ import annotations

import typer

from hwprune import cli_offline, cli_service

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hardware-aware model pruning.")
cli_offline.register(app)
cli_service.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
