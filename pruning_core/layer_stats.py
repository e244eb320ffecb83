"""Per-layer MAC counts, so the report can say what a sparse engine would skip.

Dense runtimes execute every MAC of a block- or N:M-sparse layer; an accelerator that skips zero groups
executes roughly `macs * (1 - sparsity)`. Counting per layer (Conv/Linear) lets both be reported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of every Conv/Linear layer for one sample (batch 1) of `example_input`'s shape."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            weight = mod.weight
            assert isinstance(weight, torch.Tensor)
            per_output = weight[0].numel()  # in/groups * kernel for conv, in_features for linear
            macs[name] = macs.get(name, 0) + int(out.numel() // out.shape[0]) * int(per_output)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHT_LAYERS):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        model(example_input[:1])
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return macs


def zero_fraction(model: nn.Module) -> dict[str, float]:
    """Fraction of exactly-zero weights per Conv/Linear layer."""
    return {
        name: float((mod.weight == 0).float().mean())
        for name, mod in model.named_modules()
        if isinstance(mod, WEIGHT_LAYERS)
    }


def effective_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs left if every zero weight were skipped (an upper bound on what a sparse engine saves)."""
    zeros = zero_fraction(model)
    return int(sum(m * (1.0 - zeros.get(name, 0.0)) for name, m in layer_macs(model, example_input).items()))
