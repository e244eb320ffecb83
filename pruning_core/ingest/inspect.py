"""Cheap facts about an upload for `POST /v1/models`: no onnx2torch for ONNX (the API process calls this)."""

from __future__ import annotations

from pathlib import Path

from pruning_core.ingest.formats import detect_format
from pruning_core.ingest.types import ModelInfo


def inspect_model(path: Path, input_shape: list[int] | None = None) -> ModelInfo:
    """Format, opset, inputs/outputs, parameter count and MACs (at `input_shape`, batch 1 by default).

    ONNX `params` counts floating-point initializer elements (for BatchNorm that includes running statistics).
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "onnx":
        from pruning_core.ingest.onnx_loader import onnx_info, read_onnx

        return onnx_info(read_onnx(path), input_shape)  # small external tensors may be shape data
    from pruning_core.ingest.torchscript_loader import inspect_torchscript

    return inspect_torchscript(path, input_shape)
