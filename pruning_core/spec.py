"""The pruning request as the core sees it: one plain dataclass shared by CLI, worker and benchmarks.

It is JSON-serialisable (`to_dict` / `from_dict`) so a job row can store it and replay it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pruning_core.accelerators import AcceleratorProfile, resolve_profile
from pruning_core.errors import InvalidRequest

Method = Literal["smart", "magnitude", "3d"]
Granularity = Literal["block", "channel", "nm"]
METHODS: tuple[str, ...] = ("smart", "magnitude", "3d")
GRANULARITIES: tuple[str, ...] = ("block", "channel", "nm")


@dataclass
class PruneSpec:
    method: str = "smart"
    granularity: str | None = None  # None: the profile's default granularity
    accelerator: str | dict[str, Any] = "cpu"
    target_sparsity: float | None = 0.5  # fraction of prunable groups removed (smart, magnitude)
    flops_target: float | None = None  # kept fraction of dense FLOPs (3d)
    steps: int = 300  # optimisation steps in total (pruning + fine-tuning)
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    # magnitude-only knobs
    schedule: str = "gradual"  # "oneshot" | "gradual" (cubic, Zhu & Gupta 2017)
    allocation: str = "global"  # "global" | "uniform" (same sparsity in every layer)
    min_keep: float = 0.01  # never keep less than this fraction of any layer's groups (no layer disappears)
    layers: dict[str, str] = field(default_factory=dict)  # layer name -> "prune" | "keep" overrides
    input_shape: list[int] | None = None  # required for TorchScript
    latency_seconds: float = 30.0  # time budget for measuring dense + pruned latency (runs stop early when stable)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def profile(self) -> AcceleratorProfile:
        return resolve_profile(self.accelerator)

    @property
    def resolved_granularity(self) -> str:
        return self.granularity or self.profile.default_granularity

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequest(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise InvalidRequest(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        prof = self.profile
        gran = self.resolved_granularity
        if self.method == "3d":
            if self.flops_target is None or not (0.0 < self.flops_target < 1.0):
                raise InvalidRequest("method 3d needs flops_target, the kept fraction of FLOPs, in (0, 1)")
        else:
            if self.target_sparsity is None or not (0.0 < self.target_sparsity < 1.0):
                raise InvalidRequest(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
            if gran == "block" and prof.block_shape is None:
                raise InvalidRequest(f"granularity 'block' needs a profile with block_shape; {prof.name!r} has none")
            if gran == "nm" and prof.nm is None:
                raise InvalidRequest(f"granularity 'nm' needs a profile with nm; {prof.name!r} has none")
        if self.steps < 0 or self.steps > 100_000:
            raise InvalidRequest(f"steps must be in [0, 100000], got {self.steps}")
        if self.batch_size < 1 or self.batch_size > 4096:
            raise InvalidRequest(f"batch_size must be in [1, 4096], got {self.batch_size}")
        if self.schedule not in ("oneshot", "gradual"):
            raise InvalidRequest(f"schedule must be 'oneshot' or 'gradual', got {self.schedule!r}")
        if self.allocation not in ("global", "uniform"):
            raise InvalidRequest(f"allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if not (0.0 < self.min_keep <= 1.0):
            raise InvalidRequest(f"min_keep must be in (0, 1], got {self.min_keep}")
        if self.target_sparsity is not None and self.method != "3d" and self.target_sparsity > 1.0 - self.min_keep:
            raise InvalidRequest(
                f"target_sparsity {self.target_sparsity} would leave less than min_keep={self.min_keep} of every "
                f"layer; lower min_keep (at most {1.0 - self.target_sparsity:.3g}) or the target"
            )
        if not (0.5 <= self.latency_seconds <= 600):
            raise InvalidRequest(f"latency_seconds must be in [0.5, 600], got {self.latency_seconds}")
        bad = {k: v for k, v in self.layers.items() if v not in ("prune", "keep")}
        if bad:
            raise InvalidRequest(f"layer overrides must be 'prune' or 'keep', got {bad}")
        if self.input_shape is not None and (
            len(self.input_shape) < 1 or any((not isinstance(d, int)) or d < 1 for d in self.input_shape)
        ):
            raise InvalidRequest(f"input_shape must be positive integers like [1, 3, 224, 224], got {self.input_shape}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InvalidRequest(f"unknown job fields {sorted(unknown)}")
        return cls(**d)


def parse_input_shape(text: str) -> list[int]:
    """'1,3,224,224' -> [1, 3, 224, 224], with a message a user can act on."""
    try:
        dims = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError as e:
        raise InvalidRequest(
            f"input_shape must be comma-separated positive integers like 1,3,224,224, got {text!r}"
        ) from e
    if not dims or len(dims) > 8 or any(d < 1 or d > 1_000_000 for d in dims):
        raise InvalidRequest(f"input_shape must be 1-8 positive integers like 1,3,224,224, got {text!r}")
    return dims
