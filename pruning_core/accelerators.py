"""Accelerator profiles: the sparsity shapes a target executes well.

A profile names the pruning geometry the hardware can skip: R x C weight blocks (NPU-style
block-sparse engines), N:M patterns (sparse tensor cores), and the channel multiple that dense
kernels are tiled by (CPU/GPU GEMM vector widths). Requests name a built-in profile or pass one inline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pruning_core.errors import InvalidRequest


@dataclass(frozen=True)
class AcceleratorProfile:
    name: str
    block_shape: tuple[int, int] | None = None  # (rows, cols) of the (out, in*kh*kw) weight view
    nm: tuple[int, int] | None = None  # keep N of every M consecutive input weights
    channel_multiple: int = 1  # kept channel counts are rounded to this
    default_granularity: str = "channel"
    description: str = ""

    def __post_init__(self) -> None:
        if self.block_shape is not None:
            r, c = self.block_shape
            if r < 1 or c < 1:
                raise InvalidRequest(f"block_shape must be positive, got {r}x{c}")
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise InvalidRequest(f"N:M needs 0 < N < M, got {n}:{m}")
        if self.channel_multiple < 1:
            raise InvalidRequest(f"channel_multiple must be >= 1, got {self.channel_multiple}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_shape"] = list(self.block_shape) if self.block_shape else None
        d["nm"] = list(self.nm) if self.nm else None
        return d


def _block(r: int, c: int, what: str) -> AcceleratorProfile:
    return AcceleratorProfile(
        name=f"npu-{r}x{c}", block_shape=(r, c), channel_multiple=max(r, 1), default_granularity="block",
        description=f"NPU-style block-sparse engine that skips all-zero {r}x{c} weight tiles ({what})",
    )


BUILTIN_PROFILES: dict[str, AcceleratorProfile] = {
    p.name: p
    for p in [
        AcceleratorProfile(
            name="cpu", channel_multiple=8, default_granularity="channel",
            description="x86/ARM CPU: dense kernels only, so only physically removed channels speed it up; "
            "channel counts kept to multiples of 8 for SIMD width",
        ),
        AcceleratorProfile(
            name="gpu-2of4", nm=(2, 4), channel_multiple=8, default_granularity="nm",
            description="NVIDIA Ampere+ sparse tensor cores: 2:4 structured sparsity along the input dimension",
        ),
        _block(1, 4, "row-vector tiles, e.g. 4-wide MAC lanes over inputs"),
        _block(4, 1, "column tiles, 4 output channels share one skipped input"),
        _block(4, 4, "small systolic tiles"),
        _block(8, 8, "mid-size systolic array tiles"),
        _block(16, 16, "large systolic array tiles"),
    ]
}


def resolve_profile(spec: str | dict[str, Any] | AcceleratorProfile | None) -> AcceleratorProfile:
    """A built-in profile by name, or an inline one from a dict like
    `{"block_shape": [4, 1], "nm": [2, 4], "channel_multiple": 8}`."""
    if spec is None:
        return BUILTIN_PROFILES["cpu"]
    if isinstance(spec, AcceleratorProfile):
        return spec
    if isinstance(spec, str):
        if spec not in BUILTIN_PROFILES:
            raise InvalidRequest(f"unknown accelerator profile {spec!r}; built-in: {', '.join(BUILTIN_PROFILES)}")
        return BUILTIN_PROFILES[spec]
    if isinstance(spec, dict):
        unknown = set(spec) - {"name", "block_shape", "nm", "channel_multiple", "description"}
        if unknown:
            raise InvalidRequest(f"unknown accelerator fields {sorted(unknown)}")
        try:
            block = tuple(int(v) for v in spec["block_shape"]) if spec.get("block_shape") else None
            nm = tuple(int(v) for v in spec["nm"]) if spec.get("nm") else None
            if (block is not None and len(block) != 2) or (nm is not None and len(nm) != 2):
                raise InvalidRequest("block_shape and nm take two integers each, e.g. [4, 4] and [2, 4]")
            gran = "block" if block else "nm" if nm else "channel"
            return AcceleratorProfile(
                name=str(spec.get("name", "custom")), block_shape=block, nm=nm,
                channel_multiple=int(spec.get("channel_multiple", 1)), default_granularity=gran,
                description=str(spec.get("description", "custom profile")),
            )
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"malformed inline accelerator profile: {e}") from e
    raise InvalidRequest(f"accelerator must be a profile name or an object, got {type(spec).__name__}")


def parse_block(text: str) -> tuple[int, int]:
    """'4x1' -> (4, 1)."""
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise InvalidRequest(f"block shape must look like 4x1, got {text!r}") from e
    return r, c


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError as e:
        raise InvalidRequest(f"N:M pattern must look like 2:4, got {text!r}") from e
    return n, m
