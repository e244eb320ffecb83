"""Clean-ups on the converted fx graph that make it look like the model a user would have written.

`fuse_linear_bias`: exporters write `nn.Linear` on 3-D inputs (Transformers, ViT) as MatMul + Add; our
MatMul converter makes the MatMul a bias-free nn.Linear, and this pass moves the Add's constant vector
into that Linear's bias. Torch-Pruning then removes bias entries together with the weight rows, and
pruned layers keep one module per layer.
"""

from __future__ import annotations

import torch
from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
from torch import fx, nn


def _constant(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def _drop_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a get_attr node nobody reads any more, and the tensor behind it."""
    if node.users:
        return
    owner_path, _, name = str(node.target).rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
        delattr(owner, name)


def fuse_linear_bias(gm: fx.GraphModule) -> int:
    """Fold `add(linear(x), b)` into `linear` when `b` is a constant (out,) vector; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        linear = gm.get_submodule(str(node.target))
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.kwargs or len(user.args) != 2:
            continue
        add = gm.get_submodule(str(user.target))
        if not isinstance(add, OnnxBinaryMathOperation) or add.math_op_function is not torch.add or add.broadcast:
            continue
        other = user.args[1] if user.args[0] is node else user.args[0]
        bias = _constant(gm, other)
        if bias is None or not bias.is_floating_point() or bias.numel() != linear.out_features:
            continue
        if bias.dim() > 1 and any(size != 1 for size in bias.shape[:-1]):
            continue  # a full-shape constant is not a per-feature bias
        linear.bias = nn.Parameter(bias.detach().reshape(-1).clone().float())
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        assert isinstance(other, fx.Node)
        _drop_attr(gm, other)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return fused
