"""Refuse ONNX files that would make us read outside the upload or allocate absurd memory.

Checked on the parsed proto before any runtime (ONNX Runtime, onnx2torch) sees it.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import external_data_helper, helper

from pruning_core.errors import ModelRejected

# 2**31 elements (8 GiB of float32) in one tensor is far beyond any model we can prune on one machine.
MAX_TENSOR_ELEMENTS = 2**31
# Whole-model budget: 4 * 2**30 weight elements (16 GiB float32).
MAX_TOTAL_ELEMENTS = 4 * 2**30


def _numel(dims: list[int]) -> int:
    total = 1
    for dim in dims:
        if dim < 0:
            raise ModelRejected(f"tensor with negative dimension {dims}")
        total *= dim
    return total


def _all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node values, recursing into subgraphs (If/Loop bodies)."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                tensors.extend(_all_tensors(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    tensors.extend(_all_tensors(sub))
    return tensors


def check_onnx_safety(model: onnx.ModelProto, model_dir: Path | None) -> None:
    """Raise `ModelRejected` for external data escaping `model_dir`, missing files, or absurd sizes."""
    total = 0
    root = model_dir.resolve() if model_dir is not None else None
    for tensor in _all_tensors(model.graph):
        numel = _numel(list(tensor.dims))
        if numel > MAX_TENSOR_ELEMENTS:
            raise ModelRejected(
                f"tensor {tensor.name!r} declares {numel} elements (shape {list(tensor.dims)}), more than the "
                f"{MAX_TENSOR_ELEMENTS} allowed"
            )
        total += numel
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            location = Path(info.location)
            if root is None:
                raise ModelRejected(f"tensor {tensor.name!r} uses external data, which this upload cannot carry")
            target = (root / location).resolve()
            if location.is_absolute() or not target.is_relative_to(root):
                raise ModelRejected(
                    f"tensor {tensor.name!r} points to external data {info.location!r} outside the model's folder"
                )
            if not target.is_file():
                raise ModelRejected(
                    f"tensor {tensor.name!r}: external data file {info.location!r} is missing; upload a "
                    "single-file ONNX (torch.onnx.export(..., external_data=False) or "
                    "onnx.save(model, path, save_as_external_data=False))"
                )
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            end = (info.offset or 0) + (info.length or numel * itemsize)
            if end > target.stat().st_size:
                raise ModelRejected(f"tensor {tensor.name!r}: external data file {info.location!r} is too short")
        elif tensor.raw_data and tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            if len(tensor.raw_data) != numel * itemsize:
                raise ModelRejected(
                    f"tensor {tensor.name!r} has {len(tensor.raw_data)} bytes but its shape {list(tensor.dims)} "
                    f"needs {numel * itemsize}: the file is corrupt"
                )
    if total > MAX_TOTAL_ELEMENTS:
        raise ModelRejected(f"the model declares {total} weight elements, more than the {MAX_TOTAL_ELEMENTS} allowed")
