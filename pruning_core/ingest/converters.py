"""Extra onnx2torch converters: newer opsets and weight layers that must come out trainable.

onnx2torch 1.5 stops at opset 17 for several ops the torch dynamo exporter (opset 18+) emits, and turns
MatMul-with-a-constant-weight into `matmul(x, buffer)`, which neither Torch-Pruning nor N:M masking can
see as a layer. Everything here is registered through onnx2torch's registry on import:

* **new converters** (`add_converter`): Reduce* v18/v20 (axes as an input), Split v18 (`num_outputs`),
  Pad v18+ (optional `axes` input), Gelu v20, and version aliases for ops whose newer versions only widened
  their type lists (Cast 19/21, Shape 19/21, Reshape 19/21, ...).
* **overrides** (the registry refuses duplicates, so we replace the entry in its table, documented
  here and nowhere else): MatMul and Gemm with a constant 2-D weight become `nn.Linear`; Reshape
  gains `allowzero=1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from onnx import defs
from onnx2torch.node_converters import registry
from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.node_converters.reshape import OnnxReshape
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from onnx2torch.utils.custom_export_to_onnx import DefaultExportToOnnx, OnnxToTorchModuleWithCustomExport
from torch import nn

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

# Ops whose later versions only added element types or attributes that default to the old behaviour.
# (op, new version, version onnx2torch implements). Attributes that would change semantics are
# checked by `_guarded_alias`.
_TYPE_ONLY_BUMPS: list[tuple[str, int, int]] = [
    ("Cast", 19, 13), ("Cast", 21, 13),
    ("Constant", 19, 13), ("Constant", 21, 13),
    ("ConstantOfShape", 20, 9), ("ConstantOfShape", 21, 9),
    ("Identity", 19, 16), ("Identity", 21, 16),
    ("Equal", 19, 13),
    ("GreaterOrEqual", 16, 12), ("LessOrEqual", 16, 12),
    ("Shape", 19, 15), ("Shape", 21, 15),
    ("Transpose", 21, 13), ("Unsqueeze", 21, 13), ("Squeeze", 21, 13), ("Flatten", 21, 13),
    ("AveragePool", 19, 11), ("AveragePool", 22, 11),
    ("Conv", 22, 11), ("ConvTranspose", 22, 11), ("MaxPool", 22, 12), ("GlobalAveragePool", 22, 1),
    ("HardSwish", 22, 14), ("HardSigmoid", 22, 6), ("Dropout", 22, 13), ("Elu", 22, 6),
    ("InstanceNormalization", 22, 6), ("IsInf", 20, 10), ("IsNaN", 20, 13),
]
# Attributes that, when set to a non-default value, change what an aliased op computes.
_UNSUPPORTED_ATTRS: dict[str, dict[str, Any]] = {
    "AveragePool": {"dilations": None},  # v19 added dilations; the v11 converter ignores them
    "Cast": {"saturate": 1},  # only matters for float8 targets, which torch cannot represent anyway
}


def _lookup(op_type: str, version: int) -> Converter | None:
    return registry._CONVERTER_REGISTRY.get(registry.OperationDescription("", op_type, version))


def _guarded_alias(op_type: str, base: Converter) -> Converter:
    bad = _UNSUPPORTED_ATTRS.get(op_type, {})

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for name, default in bad.items():
            value = node.attributes.get(name, default)
            if name == "dilations" and value is not None and any(d != 1 for d in value):
                raise NotImplementedError(f"{op_type} with dilations {list(value)}")
            if name != "dilations" and value != default:
                raise NotImplementedError(f"{op_type} with {name}={value}")
        return base(node, graph)

    return convert


def _register(op_type: str, version: int, converter: Converter, override: bool = False) -> None:
    """Add a converter; with `override`, replace onnx2torch's own entry (the registry has no API for that)."""
    key = registry.OperationDescription("", op_type, version)
    if key in registry._CONVERTER_REGISTRY:
        if not override:
            return  # a newer onnx2torch already implements it: trust upstream
        del registry._CONVERTER_REGISTRY[key]
    registry.add_converter(operation_type=op_type, version=version)(converter)


# --------------------------------------------------------------------------- Reduce v18 / v20


class ReduceDynamicAxes(nn.Module, OnnxToTorchModule):
    """Reduce* whose axes arrive at run time (not a constant): rare, kept for completeness."""

    def __init__(self, operation_type: str, keepdims: int, noop_with_empty_axes: int) -> None:
        super().__init__()
        self.static = OnnxReduceStaticAxes(operation_type, axes=None, keepdims=keepdims)
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        if axes is None or axes.numel() == 0:
            if self.noop_with_empty_axes:
                return x
            self.static.axes = None
        else:
            self.static.axes = sorted(int(a) % x.dim() for a in axes.tolist())
        return self.static(x)


def convert_reduce_v18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Reduce* from opset 18: `axes` moved from an attribute to an optional second input."""
    keepdims = int(node.attributes.get("keepdims", 1))
    noop = int(node.attributes.get("noop_with_empty_axes", 0))
    axes_name = node.input_values[1] if len(node.input_values) > 1 and node.input_values[1] else None
    if axes_name is None:
        if noop:
            return OperationConverterResult(
                torch_module=nn.Identity(), onnx_mapping=OnnxMapping((node.input_values[0],), node.output_values)
            )
        module: nn.Module = OnnxReduceStaticAxes(node.operation_type, axes=None, keepdims=keepdims)
        return OperationConverterResult(module, OnnxMapping((node.input_values[0],), node.output_values))
    try:
        axes = get_const_value(axes_name, graph)
    except KeyError:
        module = ReduceDynamicAxes(node.operation_type, keepdims, noop)
        return OperationConverterResult(module, onnx_mapping_from_node(node))
    axes_list = [int(a) for a in torch.as_tensor(axes).flatten().tolist()]
    if not axes_list and noop:
        module = nn.Identity()
    else:
        module = OnnxReduceStaticAxes(node.operation_type, axes=axes_list or None, keepdims=keepdims)
    return OperationConverterResult(module, OnnxMapping((node.input_values[0],), node.output_values))


# --------------------------------------------------------------------------- Split v18


class Split18(nn.Module, OnnxToTorchModule):
    """Split v18: explicit sizes, or `num_outputs` chunks of ceil(len / n) (the last one may be smaller)."""

    def __init__(self, axis: int, num_outputs: int, sizes: list[int] | None) -> None:
        super().__init__()
        self.axis, self.num_outputs, self.sizes = axis, num_outputs, sizes

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if split is not None:
            return tuple(torch.split(x, [int(s) for s in split.tolist()], dim=self.axis))
        if self.sizes is not None:
            return tuple(torch.split(x, self.sizes, dim=self.axis))
        chunk = math.ceil(x.shape[self.axis] / self.num_outputs)
        return tuple(torch.split(x, chunk, dim=self.axis))


def convert_split_v18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = int(node.attributes.get("axis", 0))
    num_outputs = int(node.attributes.get("num_outputs", len(node.output_values)))
    split_name = node.input_values[1] if len(node.input_values) > 1 and node.input_values[1] else None
    if split_name is None:
        return OperationConverterResult(
            Split18(axis, num_outputs, None), OnnxMapping((node.input_values[0],), node.output_values)
        )
    try:
        sizes = [int(s) for s in torch.as_tensor(get_const_value(split_name, graph)).tolist()]
    except KeyError:
        return OperationConverterResult(Split18(axis, num_outputs, None), onnx_mapping_from_node(node))
    return OperationConverterResult(
        Split18(axis, num_outputs, sizes), OnnxMapping((node.input_values[0],), node.output_values)
    )


# --------------------------------------------------------------------------- Pad v18+


def _pad_v18(base: Converter) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if len(node.input_values) > 3 and node.input_values[3]:
            raise NotImplementedError("Pad with an 'axes' input")
        if node.attributes.get("mode", "constant") == "wrap":
            raise NotImplementedError("Pad with mode='wrap'")
        return base(node, graph)

    return convert


# --------------------------------------------------------------------------- Reshape allowzero


class ReshapeAllowZero(nn.Module, OnnxToTorchModuleWithCustomExport):
    """Reshape with allowzero=1: a 0 in `shape` is a real zero-sized dim, not "copy the input's dim".

    Exported back as an ONNX Reshape node (not traced constants) so a dynamic batch survives re-export.
    """

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        def _forward() -> torch.Tensor:
            return torch.reshape(x, [int(s) for s in shape.tolist()])

        if torch.onnx.is_in_onnx_export():
            return DefaultExportToOnnx.export(_forward, "Reshape", x, shape, {"allowzero_i": 1})
        return _forward()


def convert_reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    module: nn.Module = ReshapeAllowZero() if node.attributes.get("allowzero", 0) == 1 else OnnxReshape()
    return OperationConverterResult(module, onnx_mapping_from_node(node))


# --------------------------------------------------------------------------- MatMul / Gemm -> nn.Linear


def _const(name: str | None, graph: OnnxGraph) -> torch.Tensor | None:
    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """nn.Linear holding `weight` (out, in) and `bias` (out,) as float32 Parameters."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.to(torch.float32))
        if bias is not None:
            assert layer.bias is not None
            layer.bias.copy_(bias.to(torch.float32))
    return layer


def convert_matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """x @ W with W a constant (in, out) matrix is a bias-free nn.Linear (weight W.T); anything else stays MatMul."""
    weight = _const(node.input_values[1], graph)
    if weight is not None and weight.dim() == 2 and weight.is_floating_point():
        return OperationConverterResult(
            _linear(weight.T, None), OnnxMapping((node.input_values[0],), node.output_values)
        )
    return _ORIGINAL["MatMul"](node, graph)


def convert_gemm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """alpha * A @ op(B) + beta * C with constant B (and C a scalar or per-output vector) is nn.Linear."""
    names = node.input_values
    weight = _const(names[1], graph)
    bias_name = names[2] if len(names) > 2 and names[2] else None
    bias = _const(bias_name, graph)
    attrs = node.attributes
    constant_bias = bias_name is None or bias is not None
    if weight is not None and not attrs.get("transA", 0) and weight.dim() == 2 and constant_bias:
        weight = weight if attrs.get("transB", 0) else weight.T  # -> (out, in)
        out_features = weight.shape[0]
        if bias is not None:
            if bias.numel() not in (1, out_features) or (bias.dim() == 2 and bias.shape[0] != 1):
                return _ORIGINAL["Gemm"](node, graph)
            bias = bias.reshape(-1).expand(out_features) * float(attrs.get("beta", 1.0))
        return OperationConverterResult(
            _linear(weight * float(attrs.get("alpha", 1.0)), bias), OnnxMapping((names[0],), node.output_values)
        )
    return _ORIGINAL["Gemm"](node, graph)


# --------------------------------------------------------------------------- Gelu v20


def convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Gelu (opset 20; the dynamo exporter emits it for nn.GELU) is torch's GELU with the same `approximate`."""
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f"Gelu with approximate={approximate!r}")
    return OperationConverterResult(nn.GELU(approximate=approximate), onnx_mapping_from_node(node))


# --------------------------------------------------------------------------- re-export compatibility


def _patch_opset_lookup() -> None:
    """onnx2torch's modules ask `torch.onnx.symbolic_helper` for the export opset when a converted graph is
    exported again (Squeeze, Shape, Reduce*); torch 2.9+ moved that global, so re-export crashed with an
    AttributeError. Point the old name at the TorchScript exporter's globals."""
    from torch.onnx import symbolic_helper

    if hasattr(symbolic_helper, "GLOBALS") or hasattr(symbolic_helper, "_export_onnx_opset_version"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # a future torch moved it again: re-export of those ops will say so itself
        return
    symbolic_helper.GLOBALS = GLOBALS


# --------------------------------------------------------------------------- registration

_ORIGINAL: dict[str, Converter] = {}
_REDUCE_OPS = ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSumSquare"]  # ReduceSum moved to axes-as-input in v13


def register_all() -> None:
    """Idempotent: called on import of this module."""
    if _ORIGINAL:
        return
    _patch_opset_lookup()
    for op_type, version in (("MatMul", 13), ("Gemm", 13)):
        original = _lookup(op_type, version)
        assert original is not None, f"onnx2torch lost its {op_type}-{version} converter"
        _ORIGINAL[op_type] = original
    for version in (1, 9, 13):
        _register("MatMul", version, convert_matmul, override=True)
    for version in (9, 11, 13):
        _register("Gemm", version, convert_gemm, override=True)
    for version in (5, 13, 14, 19, 21):
        _register("Reshape", version, convert_reshape, override=True)
    for op_type in _REDUCE_OPS:
        for version in (18, 20):
            if defs.get_schema(op_type, max_inclusive_version=version, domain="").since_version == version:
                _register(op_type, version, convert_reduce_v18)
    _register("Split", 18, convert_split_v18)
    _register("Gelu", 20, convert_gelu)
    pad13 = _lookup("Pad", 13)
    assert pad13 is not None, "onnx2torch lost its Pad-13 converter"
    for version in (18, 19, 21):
        _register("Pad", version, _pad_v18(pad13))
    for op_type, new, old in _TYPE_ONLY_BUMPS:
        base = _lookup(op_type, old)
        if base is not None and defs.get_schema(op_type, max_inclusive_version=new, domain="").since_version == new:
            _register(op_type, new, _guarded_alias(op_type, base))


register_all()
