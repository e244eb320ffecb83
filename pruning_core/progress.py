"""Progress reporting and cancellation, shared by every long-running stage.

A stage calls `progress(stage, fraction, metrics)`; callers decide how often to persist it. Between
optimisation steps stages call `check_cancel()`, which raises `Cancelled` when the owner asked to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pruning_core.errors import Cancelled

ProgressFn = Callable[[str, float, dict[str, Any]], None]
CancelFn = Callable[[], bool]


def _no_progress(stage: str, fraction: float, metrics: dict[str, Any]) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class Progress:
    """Maps each stage's own 0..1 onto the job's overall 0..1 (stages have weights)."""

    report: ProgressFn = _no_progress
    cancelled: CancelFn = _never
    _start: float = 0.0
    _span: float = 1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def stage(self, name: str, start: float, end: float) -> StageProgress:
        return StageProgress(self, name, start, end)

    def check_cancel(self) -> None:
        if self.cancelled():
            raise Cancelled("job cancelled by its owner")


@dataclass
class StageProgress:
    parent: Progress
    name: str
    start: float
    end: float

    def __call__(self, fraction: float, metrics: dict[str, Any] | None = None) -> None:
        f = min(max(fraction, 0.0), 1.0)
        self.parent.report(self.name, self.start + (self.end - self.start) * f, metrics or {})

    def check_cancel(self) -> None:
        self.parent.check_cancel()
