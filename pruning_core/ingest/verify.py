"""Check a converted torch graph against the original runtime on the same seeded random input.

Tolerance: max |torch - reference| <= RTOL * max |reference| + ATOL, per output. Two float32
implementations of the same graph (ONNX Runtime's MLAS kernels vs torch's oneDNN/ATen) sum in
different orders; each op adds ~1e-7 relative error and deep nets (densenet121, 120+ layers) with
random weights amplify it to ~1e-5..1e-4 of the output scale. 1e-3 of the scale leaves a 10x margin
above that, while a real conversion bug (wrong axis, transposed weight, dropped bias) is O(1) of the
scale. ATOL keeps all-zero outputs from demanding exact equality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pruning_core.errors import ModelRejected

RTOL = 1e-3
ATOL = 1e-5
SEED = 0


@dataclass
class Agreement:
    """Worst normalised error over all outputs and whether it is within tolerance."""

    max_abs_diff: float
    scale: float
    ok: bool

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.scale, 1e-12)


def random_inputs(shapes: Sequence[Sequence[int]], dtypes: Sequence[str], seed: int = SEED) -> list[np.ndarray]:
    """Seeded inputs: standard normal for floats, zeros for integer (index-like) inputs."""
    generator = torch.Generator().manual_seed(seed)
    arrays = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if dtype.startswith("float"):
            arrays.append(torch.randn(list(shape), generator=generator).numpy().astype(dtype))
        else:
            arrays.append(np.zeros(list(shape), dtype=dtype))
    return arrays


def as_list(outputs: object) -> list[np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().cpu().numpy()]
    if isinstance(outputs, (list, tuple)):
        return [a for item in outputs for a in as_list(item)]
    if isinstance(outputs, np.ndarray):
        return [outputs]
    raise TypeError(f"unexpected model output type {type(outputs).__name__}")


def _agreement(got: np.ndarray, want: np.ndarray) -> Agreement:
    if got.shape != want.shape:
        return Agreement(float("inf"), 0.0, False)
    if not want.size:
        return Agreement(0.0, 0.0, True)
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    scale = float(np.max(np.abs(want.astype(np.float64))))
    return Agreement(diff, scale, bool(np.isfinite(diff)) and diff <= RTOL * scale + ATOL)


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> Agreement:
    """The first output out of tolerance, else the output with the largest relative error."""
    assert len(got) == len(want), f"{len(got)} outputs vs {len(want)} expected"
    results = [_agreement(a, b) for a, b in zip(got, want, strict=True)]
    failed = [r for r in results if not r.ok]
    if failed:
        return failed[0]
    return max(results, key=lambda r: r.relative, default=Agreement(0.0, 0.0, True))


def verify(
    module: torch.nn.Module,
    reference: Callable[[list[np.ndarray]], list[np.ndarray]],
    inputs: list[np.ndarray],
    what: str,
) -> Agreement:
    """Run both on `inputs`; `ModelRejected` if they disagree (the converted graph would prune the wrong model)."""
    want = reference(inputs)
    try:
        with torch.no_grad():
            got = as_list(module(*[torch.from_numpy(x) for x in inputs]))
    except Exception as exc:
        raise ModelRejected(f"the converted torch graph failed to run: {type(exc).__name__}: {exc}") from exc
    agreement = compare(got, want)
    if not agreement.ok:
        raise ModelRejected(
            f"the converted torch graph disagrees with {what}: max |diff| {agreement.max_abs_diff:.3g} on outputs "
            f"of scale {agreement.scale:.3g} (tolerance {RTOL:g} x scale + {ATOL:g}); the model uses an op whose "
            "conversion is wrong, please report it with the model"
        )
    return agreement
