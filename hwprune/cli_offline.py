"""Offline commands: `hwprune prune` (one job in-process) and `hwprune bench` (ONNX Runtime latency)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the offline commands to the main app (implemented with the pipeline)."""
