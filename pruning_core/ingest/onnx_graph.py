"""Read an ONNX graph's interface (names, shapes, dtypes, dynamic batch) and pick a concrete example shape."""

from __future__ import annotations

import onnx
from onnx import helper

from pruning_core.errors import ModelRejected
from pruning_core.ingest.types import TensorSpec


def _dtype(elem_type: int) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # unknown / exotic element type: show ONNX's own name
        return str(onnx.TensorProto.DataType.Name(elem_type)).lower()


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    shape: list[int | str] = []
    for index, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"dim{index}")
    return TensorSpec(name=value.name, shape=shape, dtype=_dtype(tensor_type.elem_type))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Real inputs (old exporters also list initializers as inputs; those are weights, not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


def default_opset(model: onnx.ModelProto) -> int | None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return None


def has_dynamic_batch(spec: TensorSpec) -> bool:
    return bool(spec.shape) and isinstance(spec.shape[0], str)


def example_shapes(inputs: list[TensorSpec], input_shape: list[int] | None) -> list[list[int]]:
    """Concrete shapes for every input: `input_shape` for the first (batch forced to 1 if it is dynamic),
    the declared shape for the others, symbolic batch dims set to 1."""
    if not inputs:
        raise ModelRejected("the ONNX graph has no inputs")
    shapes: list[list[int]] = []
    for index, spec in enumerate(inputs):
        if index == 0 and input_shape is not None:
            if len(input_shape) != len(spec.shape):
                raise ModelRejected(
                    f"input_shape {input_shape} has {len(input_shape)} dims "
                    f"but input {spec.name!r} has shape {spec.shape}"
                )
            for want, declared in zip(input_shape, spec.shape, strict=True):
                if isinstance(declared, int) and declared != want:
                    raise ModelRejected(
                        f"input_shape {input_shape} contradicts {spec.name!r}'s fixed shape {spec.shape}"
                    )
            if any(d <= 0 for d in input_shape):
                raise ModelRejected(f"input_shape {input_shape} must be positive")
            shapes.append(list(input_shape))
            continue
        shape = [1 if (axis == 0 and isinstance(d, str)) else d for axis, d in enumerate(spec.shape)]
        if any(isinstance(d, str) for d in shape):
            raise ModelRejected(
                f"input {spec.name!r} has symbolic dims {spec.shape}: pass input_shape (e.g. 1,3,224,224)"
                + ("" if index == 0 else "; only the first input's shape can be given, the others must be fixed")
            )
        shapes.append([int(d) for d in shape])
    return shapes
