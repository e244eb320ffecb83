"""Ingestion: ONNX or TorchScript bytes in, a trainable, verified torch graph out.

Every model becomes one kind of graph: TorchScript is exported to ONNX in memory, ONNX is normalised
(onnxslim) and converted with onnx2torch plus our converters (`converters.py`), then checked against the
original runtime (`verify.py`).
"""

from pruning_core.ingest.formats import detect_format
from pruning_core.ingest.inspect import inspect_model
from pruning_core.ingest.loader import load_model
from pruning_core.ingest.types import LoadedModel, ModelInfo, TensorSpec

__all__ = ["LoadedModel", "ModelInfo", "TensorSpec", "detect_format", "inspect_model", "load_model"]
