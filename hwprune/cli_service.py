"""Service commands: `serve`, `worker`, `keys create`, `db upgrade`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the service commands to the main app (implemented with the service)."""
