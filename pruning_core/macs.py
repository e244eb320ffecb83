"""Multiply-accumulate and parameter counts, from torch (FlopCounterMode) and from an ONNX graph.

Both count only the heavy ops a pruner can shrink: convolutions (incl. transposed) and matrix products
(Linear/Gemm/MatMul, attention's batched matmuls). Element-wise ops, norms and bias adds are ignored,
so the two counters agree on the same model (tested on the zoo in tests/test_ingest_zoo.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import onnx
import torch
from onnx import shape_inference
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


# FlopCounterMode knows the GPU attention kernels but not the CPU one that
# nn.MultiheadAttention / F.scaled_dot_product_attention dispatch to here; without it an original
# Transformer would count fewer MACs than its ONNX export (where attention is two MatMuls).
_EXTRA_FORMULAS: dict[Any, Any] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def count_macs(module: nn.Module, example_input: Tensor) -> int:
    """MACs of one forward pass at `example_input`'s shape (FlopCounterMode counts 2 FLOPs per MAC)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        module(example_input)
    return int(counter.get_total_flops()) // 2


def count_params(module: nn.Module) -> int:
    """Elements of all parameters (shared ones once)."""
    return sum(p.numel() for p in module.parameters())


# Initializers above this many elements are weights, never shape data: `_light_copy` leaves them out.
_SHAPE_DATA_MAX = 4096


def _light_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every large initializer turned into a typed graph input of the same shape, and the
    names of the model's real inputs.

    Shape inference (and the ORT fallback) only need the weights' shapes; copying a 330 MB ViT just to
    fix its input dims cost seconds per inspection.
    """
    from onnx import helper

    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    real = [v.name for v in graph.input if v.name not in init_names]
    # Tensors whose bytes live in an external file that was not loaded are lifted too (their shape is known).
    lifted = [
        math.prod(t.dims) > _SHAPE_DATA_MAX or onnx.external_data_helper.uses_external_data(t)
        for t in graph.initializer
    ]
    small = [t for t, lift in zip(graph.initializer, lifted, strict=True) if not lift]
    large = [t for t, lift in zip(graph.initializer, lifted, strict=True) if lift]
    inputs = [v for v in graph.input if v.name in real]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large]
    light = helper.make_model(
        helper.make_graph(list(graph.node), graph.name or "g", inputs, list(graph.output), initializer=small),
        opset_imports=list(model.opset_import),
    )
    light.ir_version = model.ir_version
    return light, real


def _static_shapes(light: onnx.ModelProto, real: list[str], input_shape: list[int] | None) -> dict[str, list[int]]:
    """Concrete shapes of every value after fixing the first input to `input_shape` (batch 1 by default).

    Modifies `light` (from `_light_copy`) in place: its real inputs get concrete dims.
    """
    by_name = {v.name: v for v in light.graph.input}
    for index, name in enumerate(real):
        dims = by_name[name].type.tensor_type.shape.dim
        if index == 0 and input_shape is not None:
            assert len(input_shape) == len(dims), f"input_shape {input_shape} has the wrong rank for {name}"
            for dim, size in zip(dims, input_shape, strict=True):
                dim.Clear()
                dim.dim_value = size
        elif dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1  # batch 1, like every MAC number we report
    try:
        inferred = shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shape inference is best effort: what it cannot resolve goes to the ORT fallback
        inferred = light
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


_HEAVY = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _heavy_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in _HEAVY]


def _runtime_shapes(
    model: onnx.ModelProto, fixed_shapes: dict[str, list[int]], wanted: set[str]
) -> dict[str, list[int]]:
    """Exact shapes by running ONNX Runtime once on zeros with the `wanted` values exposed as outputs.

    Static inference gives up on shape arithmetic around a dynamic batch (channel shuffle, attention
    head reshapes of the TorchScript exporter); one batch-1 run is cheap and always right.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in sorted(wanted - existing):
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value alive
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    elem_types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    feeds = {}
    for value in session.get_inputs():
        shape = fixed_shapes.get(value.name) or [d if isinstance(d, int) else 1 for d in value.shape]
        feeds[value.name] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(elem_types[value.name]))
    names = [o.name for o in session.get_outputs()]
    return {name: list(np.asarray(v).shape) for name, v in zip(names, session.run(None, feeds), strict=True)}


def onnx_macs(model: onnx.ModelProto, input_shape: list[int] | None) -> int:
    """MACs of Conv/ConvTranspose/Gemm/MatMul at the first input fixed to `input_shape` (batch 1 by default).

    Shapes come from ONNX shape inference; when it cannot resolve a heavy op (shape arithmetic on a
    dynamic batch), from one ONNX Runtime run on zeros.
    """
    light, real = _light_copy(model)
    shapes = _static_shapes(light, real, input_shape)
    heavy = _heavy_nodes(model)
    needed = {name for n in heavy for name in (*n.input[:2], n.output[0]) if name}
    if not needed.issubset(shapes):
        # Every input of `light` (real ones and lifted weights) now has a concrete shape: feed zeros.
        fixed = {v.name: shapes[v.name] for v in light.graph.input if v.name in shapes}
        # Best effort: a graph ORT cannot run counts only what static inference resolved.
        with contextlib.suppress(Exception):
            shapes.update(_runtime_shapes(light, fixed, needed - set(shapes)))
    total = 0
    for node in heavy:
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
