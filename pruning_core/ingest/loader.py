"""`load_model`: the single entry point the pipeline uses, whatever the upload's format."""

from __future__ import annotations

from pathlib import Path

from pruning_core.ingest.formats import detect_format
from pruning_core.ingest.types import LoadedModel


def load_model(path: Path, input_shape: list[int] | None = None, verify: bool = True) -> LoadedModel:
    """Trainable float32 CPU torch graph in eval mode, verified against the original runtime unless `verify=False`."""
    path = Path(path)
    if detect_format(path) == "onnx":
        from pruning_core.ingest.onnx_loader import load_onnx

        return load_onnx(path, input_shape, verify)
    from pruning_core.ingest.torchscript_loader import load_torchscript

    return load_torchscript(path, input_shape, verify)
