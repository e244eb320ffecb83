"""Depth axis: find residual blocks in a torch.fx graph, rank them, and remove them.

A residual block computes `y = x + f(x)` with an identity skip. When its input and output shapes match it
can become the identity `y = x`: we rewire the add to its skip input and erase the branch `f`. Blocks with a
projection skip (strided / channel-changing `downsample`) are not removable, because `y != x` in shape.

Ranking criterion (smaller = more removable): the relative norm of the branch output, ||f(x)|| / ||x||,
averaged over calibration batches. A block whose branch adds little to its input changes the network least
when removed. This is the depth "importance" of Wang et al., ICML 2021 (arXiv 2010.04879) in spirit: the
paper ranks blocks by the accuracy drop; the norm ratio is a one-forward-pass proxy for it.

Works on `torch.fx.symbolic_trace` graphs (`operator.add` / `torch.add`) and onnx2torch graphs
(`OnnxBinaryMathOperation` modules whose function is `torch.add`). A ReLU after the add (ResNet) stays: it
then sees the skip input, which is itself a ReLU output, so it is the identity.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pruning_core.errors import ModelRejected

_ADD_FUNCTIONS: tuple[Any, ...] = (operator.add, operator.iadd, torch.add)


@dataclass(frozen=True)
class ResidualBlock:
    """One removable unit: `add = skip + branch`, with `nodes` the branch nodes erased on removal."""

    name: str  # the add node's name: a stable id across deep copies and channel pruning
    skip: str  # node name of the identity input x
    branch: str  # node name of f(x)
    nodes: tuple[str, ...]  # every node of f, in graph order
    shape: tuple[int, ...]  # activation shape at the example input

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "skip": self.skip, "branch": self.branch, "nodes": len(self.nodes),
                "shape": list(self.shape)}


def _is_add(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        fn = getattr(mod, "math_op_function", None)  # onnx2torch OnnxBinaryMathOperation
        return fn is torch.add and getattr(mod, "broadcast", None) in (None, 0) and len(node.args) == 2
    return False


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _branch_nodes(skip: fx.Node, out: fx.Node) -> list[fx.Node] | None:
    """Nodes between `skip` (exclusive) and `out` (inclusive) if `out` is computed from `skip` alone.

    Walks `out`'s inputs backwards; every path must end at `skip` or at a constant (get_attr). Returns None
    when the branch reads anything else (another activation, a placeholder), which would make it not f(x).
    """
    seen: dict[fx.Node, None] = {}
    stack = [out]
    reaches_skip = False
    while stack:
        n = stack.pop()
        if n is skip:
            reaches_skip = True
            continue
        if n in seen:
            continue
        if n.op == "get_attr":
            continue
        if n.op in ("placeholder", "output"):
            return None
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen) if reaches_skip else None


def find_residual_blocks(gm: fx.GraphModule, example_input: Tensor) -> list[ResidualBlock]:
    """Every add whose one input is an identity skip x and whose other input is f(x) of the same shape."""
    if not isinstance(gm, fx.GraphModule):
        raise ModelRejected("depth pruning needs a torch.fx GraphModule (models converted from ONNX are)")
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    gm.train(was_training)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks: list[ResidualBlock] = []
    for node in gm.graph.nodes:
        if not _is_add(gm, node):
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for skip, out in ((a, b), (b, a)):
            nodes = _branch_nodes(skip, out)
            if nodes is None:
                continue
            shapes = {_shape(skip), _shape(out), _shape(node)}
            if len(shapes) != 1 or None in shapes:
                continue
            inside = set(nodes) | {node}
            # Erasing is only safe when nothing outside the block reads a branch activation.
            if any(u not in inside for n in nodes for u in n.users):
                continue
            nodes.sort(key=order.__getitem__)
            shape = _shape(node)
            assert shape is not None
            blocks.append(ResidualBlock(node.name, skip.name, out.name, tuple(n.name for n in nodes), shape))
            break
    return blocks


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes (skip and branch outputs)."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.wanted = set(names)
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


@torch.no_grad()
def branch_ratios(gm: fx.GraphModule, blocks: Sequence[ResidualBlock], inputs: Tensor,
                  batch_size: int = 32) -> dict[str, float]:
    """Mean over batches of ||f(x)|| / ||x|| per block (the removal criterion; smaller = remove first)."""
    if not blocks:
        return {}
    was_training = gm.training
    gm.eval()
    names = {b.skip for b in blocks} | {b.branch for b in blocks}
    sums = dict.fromkeys((b.name for b in blocks), 0.0)
    batches = 0
    p = next(gm.parameters(), None)
    device = p.device if p is not None else inputs.device
    for i in range(0, inputs.shape[0], batch_size):
        rec = _Recorder(gm, names)
        rec.run(inputs[i : i + batch_size].to(device))
        for b in blocks:
            x, f = rec.values[b.skip], rec.values[b.branch]
            sums[b.name] += float(f.norm() / x.norm().clamp_min(1e-12))
        batches += 1
    gm.train(was_training)
    return {k: v / batches for k, v in sums.items()}


def rank_blocks(gm: fx.GraphModule, blocks: Sequence[ResidualBlock], inputs: Tensor) -> list[ResidualBlock]:
    """Blocks ordered most removable first (smallest branch ratio); ties keep graph order."""
    ratios = branch_ratios(gm, blocks, inputs)
    return sorted(blocks, key=lambda b: ratios[b.name])


def remove_blocks(gm: fx.GraphModule, names: Iterable[str], inplace: bool = False) -> fx.GraphModule:
    """Make the named blocks the identity: the add's users read the skip input; the branch is erased.

    Works on a deep copy unless `inplace`; unused submodules (the branch's convs, BNs) are deleted so
    parameter counts really drop.
    """
    out = gm if inplace else copy.deepcopy(gm)
    wanted = set(names)
    if not wanted:
        return out
    # Re-find the blocks on `out` itself: shapes are not needed, only the graph structure.
    by_name = {n.name: n for n in out.graph.nodes}
    missing = wanted - set(by_name)
    assert not missing, f"blocks {sorted(missing)} are not in this graph (already removed?)"
    for name in wanted:
        add = by_name[name]
        assert _is_add(out, add), f"{name} is not an add node"
        a, b = add.args
        assert isinstance(a, fx.Node) and isinstance(b, fx.Node), f"{name}: add of non-tensors"
        for skip, branch_out in ((a, b), (b, a)):
            nodes = _branch_nodes(skip, branch_out)
            if nodes is not None and all(u in set(nodes) | {add} for n in nodes for u in n.users):
                break
        else:
            raise AssertionError(f"{name} is not a residual block with an identity skip")
        add.replace_all_uses_with(skip)
        out.graph.erase_node(add)
        order = {n: i for i, n in enumerate(out.graph.nodes)}
        for n in sorted(nodes, key=order.__getitem__, reverse=True):
            assert not n.users, f"branch node {n.name} of {name} is still used"
            out.graph.erase_node(n)
    out.graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    return out


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
