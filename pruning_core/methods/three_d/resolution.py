"""Resolution axis: run the model on smaller inputs, for models that accept it.

A model accepts a smaller input when something resolution-independent (global pooling) sits before the
head. We do not guess that from op names: we run the model at the new size and require the same output
shape. Sizes are rounded to a multiple of min(8, stride product) so feature maps stay whole at every
stride (stride product = input height / smallest feature-map height).

During fine-tuning the pruned model is wrapped in `ResizeInput`, which resizes the (full-size) training
batches; the exported model takes the small input directly, so callers must resize their inputs: the
report says so. Reference: Wang et al., ICML 2021 (arXiv 2010.04879), the "resolution" dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp


class ResizeInput(nn.Module):
    """`model(resize(x))`: plain bilinear (`F.interpolate`, align_corners=False), the resize the pipeline and the
    report tell users to apply, so fine-tuning sees what deployment will see."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model(x)


def unwrap(model: nn.Module) -> tuple[nn.Module, tuple[int, int] | None]:
    """The inner model and its input size if `model` is a `ResizeInput`, else (model, None)."""
    if isinstance(model, ResizeInput):
        return model.model, model.size
    return model, None


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def stride_product(model: nn.Module, example_input: Tensor) -> int:
    """Input height / smallest 4-D feature-map height above 1 in the graph (1 when unknown).

    Heights of 1 are skipped: they are the outputs of global pooling, which has no stride to respect.
    """
    if example_input.ndim != 4 or not isinstance(model, fx.GraphModule):
        return 1
    was = model.training
    model.eval()
    try:
        ShapeProp(model).propagate(example_input[:1])
    except Exception:  # a graph ShapeProp cannot run is still usable; just no stride information
        return 1
    finally:
        model.train(was)
    heights = [
        int(m.shape[2]) for n in model.graph.nodes
        if (m := n.meta.get("tensor_meta")) is not None and hasattr(m, "shape") and len(m.shape) == 4
        and int(m.shape[2]) > 1
    ]
    smallest = min(heights, default=example_input.shape[2])
    return max(1, example_input.shape[2] // max(smallest, 1))


def size_multiple(model: nn.Module, example_input: Tensor) -> int:
    return max(1, min(8, stride_product(model, example_input)))


@torch.no_grad()
def accepts(model: nn.Module, example_input: Tensor, size: tuple[int, int]) -> bool:
    """True when the model runs at `size` and gives the same output shape as at the original size."""
    was = model.training
    model.eval()
    try:
        ref = model(example_input[:1])
        out = model(resize(example_input[:1], size))
    except Exception:  # any failure at the new size means "does not accept it" (e.g. a fixed-size Linear)
        return False
    finally:
        model.train(was)
    return isinstance(out, Tensor) and isinstance(ref, Tensor) and out.shape == ref.shape


def round_size(h: int, w: int, r: float, multiple: int) -> tuple[int, int]:
    """(h, w) scaled by r, rounded to the nearest multiple, never below one multiple."""
    def one(s: int) -> int:
        return max(multiple, math.floor(s * r / multiple + 0.5) * multiple)

    return (min(h, one(h)), min(w, one(w)))


def candidate_sizes(model: nn.Module, example_input: Tensor, min_ratio: float = 0.25) -> list[tuple[int, ...]]:
    """Accepted sizes from the full size down to `min_ratio` of it, largest first; [full] if none smaller.

    Non-4-D inputs (sequences, features) have no resolution axis: only the full size comes back.
    """
    if example_input.ndim != 4:
        return [tuple(example_input.shape[-2:])]
    h, w = int(example_input.shape[2]), int(example_input.shape[3])
    m = size_multiple(model, example_input)
    sizes: list[tuple[int, ...]] = [(h, w)]
    for hh in range(h - 1, 0, -1):
        s = round_size(h, w, hh / h, m)
        if s[0] == hh and s not in sizes and hh >= min_ratio * h:
            sizes.append(s)
    return [s for s in sizes if s == (h, w) or accepts(model, example_input, (s[0], s[1]))]
