"""Which weight layers may be pruned, and why (the reasons go into report["layers"]).

Decided per op type: Conv (not transposed) and Linear are prunable; the layers that produce the model's
outputs keep them (a classifier keeps its classes); depthwise convs are kept for block/N:M (one input per
output: nothing to tile, no reduction dimension to run N:M on); N:M needs the input dimension to be a
multiple of M. A per-layer-name override ("prune" | "keep") wins where the geometry allows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pruning_core.errors import InvalidRequest

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_TYPES = (*CONV_TYPES, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv/Linear (and transposed conv, reported as kept) by qualified name, in module order."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (*WEIGHT_TYPES, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))}


def op_type(m: nn.Module) -> str:
    return type(m).__name__


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups > 1 and m.groups == m.in_channels


def _flatten(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def output_layers(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> set[str]:
    """Weight layers whose outputs reach a model output without passing another weight layer.

    Found by walking the autograd graph back from the outputs: the first weight layer on each path.
    """
    layers = weight_layers(model)
    grad_fn_owner: dict[Any, str] = {}
    hooks = []

    def hook_for(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.grad_fn is not None:
                grad_fn_owner[out.grad_fn] = name
        return hook

    for name, m in layers.items():
        hooks.append(m.register_forward_hook(hook_for(name)))
    try:
        with torch.enable_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            outs = _flatten(model(*args))
    finally:
        for h in hooks:
            h.remove()
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in grad_fn_owner:
            found.add(grad_fn_owner[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return found


def check_overrides(layers: Mapping[str, nn.Module], overrides: Mapping[str, str]) -> None:
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise InvalidRequest(f"layer overrides name unknown layers {unknown}; weight layers are "
                             f"{list(layers)[:20]}{' ...' if len(layers) > 20 else ''}")
    bad = {k: v for k, v in overrides.items() if v not in ("prune", "keep")}
    if bad:
        raise InvalidRequest(f"layer overrides must be 'prune' or 'keep', got {bad}")


def layer_policy(name: str, m: nn.Module, granularity: str, outputs: set[str], overrides: Mapping[str, str],
                 nm_m: int | None = None) -> tuple[bool, str]:
    """(prunable, reason) for one weight layer under block or N:M geometry."""
    if not isinstance(m, WEIGHT_TYPES):
        return False, f"{op_type(m)}: not supported for pruning"
    if is_depthwise(m):
        return False, "depthwise conv: no reduction dimension to sparsify"
    if granularity == "nm":
        assert nm_m is not None, "nm granularity needs M"
        w = m.weight
        if w.shape[1] % nm_m != 0:
            what = "in_features" if isinstance(m, nn.Linear) else "input channels per group"
            return False, f"{what} {w.shape[1]} not a multiple of M={nm_m}"
    ov = overrides.get(name)
    if ov == "keep":
        return False, "override: keep"
    if ov == "prune":
        return True, "override: prune"
    if name in outputs:
        return False, "produces a model output: kept dense (override with 'prune')"
    return True, f"{op_type(m)} weights pruned in {granularity} groups"
