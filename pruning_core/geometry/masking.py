"""Masks as parametrizations: effective weight = raw weight * expand(mask).

`torch.nn.utils.parametrize` keeps the raw weight as the trainable parameter
(`<module>.parametrizations.<name>.original`) and recomputes the masked tensor on every access, so
gradients reach both the weights and soft masks, and removing the parametrization bakes the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

MaskFn = Callable[[], "Tensor | None"]  # returns a tensor broadcastable to the weight, or None = all ones


class MaskParametrization(nn.Module):
    """Multiplies a tensor by the product of its mask sources (several channel groups may share a tensor)."""

    def __init__(self, sources: list[MaskFn]) -> None:
        super().__init__()
        self.sources = sources

    def forward(self, w: Tensor) -> Tensor:
        out = w
        for fn in self.sources:
            m = fn()
            if m is not None:
                out = out * m.to(dtype=w.dtype, device=w.device)
        return out


def raw_tensor(module: nn.Module, name: str) -> Tensor:
    """The stored (unmasked) tensor behind `module.<name>`, parametrized or not."""
    if parametrize.is_parametrized(module, name):
        t: Tensor = getattr(module.parametrizations, name).original
        return t
    t2: Tensor = getattr(module, name)
    return t2


def add_mask(module: nn.Module, name: str, sources: list[MaskFn]) -> None:
    # unsafe=True: the mask may be soft and carry grad; shapes and dtypes never change.
    parametrize.register_parametrization(module, name, MaskParametrization(sources), unsafe=True)


def remove_masks(module: nn.Module, bake: bool) -> None:
    """Remove every parametrization of `module`; `bake=True` keeps the masked values as the new weights."""
    if not parametrize.is_parametrized(module):
        return
    params: nn.ModuleDict = module.parametrizations  # type: ignore[assignment]
    for name in list(params.keys()):
        with torch.no_grad():
            parametrize.remove_parametrizations(module, name, leave_parametrized=bake)
