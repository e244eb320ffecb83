"""Multiply-accumulate and parameter counts, from torch (FlopCounterMode) and from an ONNX graph.

Both count only the heavy ops a pruner can shrink: convolutions (incl. transposed) and matrix products
(Linear/Gemm/MatMul, attention's batched matmuls). Element-wise ops, norms and bias adds are ignored,
so the two counters agree on the same model (tested on the zoo in tests/test_ingest_zoo.py).
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import shape_inference
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(module: nn.Module, example_input: Tensor) -> int:
    """MACs of one forward pass at `example_input`'s shape (FlopCounterMode counts 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example_input)
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module) -> int:
    """Elements of all parameters (shared ones once)."""
    return sum(p.numel() for p in module.parameters())


def _static_shapes(model: onnx.ModelProto, input_shape: list[int] | None) -> dict[str, list[int]]:
    """Concrete shapes of every value after fixing the first input to `input_shape` (batch 1 by default)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init_names = {t.name for t in fixed.graph.initializer}
    real_inputs = [i for i in fixed.graph.input if i.name not in init_names]
    for index, value in enumerate(real_inputs):
        dims = value.type.tensor_type.shape.dim
        if index == 0 and input_shape is not None:
            assert len(input_shape) == len(dims), f"input_shape {input_shape} has the wrong rank for {value.name}"
            for dim, size in zip(dims, input_shape, strict=True):
                dim.Clear()
                dim.dim_value = size
        elif dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1  # batch 1, like every MAC number we report
    try:
        inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # shape inference is best effort: unknown shapes just count as 0 MACs
        inferred = fixed
    shapes: dict[str, list[int]] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[value.name] = dims
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def onnx_macs(model: onnx.ModelProto, input_shape: list[int] | None) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul from shapes inferred with the first input fixed to `input_shape`.

    Ops whose shapes cannot be inferred count 0 (a lower bound rather than a guess).
    """
    shapes = _static_shapes(model, input_shape)
    total = 0
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        ins = [shapes.get(name) for name in node.input]
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type == "Conv" and ins[1] is not None and out is not None:
            weight = ins[1]  # (Cout, Cin/groups, k...)
            total += out[0] * math.prod(weight) * math.prod(out[2:])
        elif node.op_type == "ConvTranspose" and ins[0] is not None and ins[1] is not None:
            weight = ins[1]  # (Cin, Cout/groups, k...); cost scales with the *input* spatial size
            total += ins[0][0] * math.prod(weight) * math.prod(ins[0][2:])
        elif node.op_type == "Gemm" and ins[0] is not None and out is not None:
            k = ins[0][0] if _attr(node, "transA", 0) else ins[0][1]
            total += out[0] * out[1] * k
        elif node.op_type == "MatMul" and ins[0] is not None and out is not None:
            k = ins[0][-1]
            total += math.prod(out) * k
    return int(total)
