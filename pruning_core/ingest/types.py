"""Plain data describing an ingested model: what `POST /v1/models` answers and what the pipeline prunes.

Kept free of onnx2torch so the API process can import it cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TensorSpec:
    """One graph input or output; symbolic dims are strings (e.g. "batch") so clients see they are free."""

    name: str
    shape: list[int | str]
    dtype: str  # numpy-style name: "float32", "int64", ...


@dataclass
class ModelInfo:
    """Cheap facts about an uploaded model (no torch conversion for ONNX)."""

    format: str  # "onnx" | "torchscript"
    opset: int | None  # default-domain opset; None for TorchScript
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    params: int = 0  # weight elements (initializers / parameters)
    macs: int = 0  # multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul at the example input shape

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    """A trainable torch graph plus what export needs later to give the user back "their" model."""

    module: torch.nn.Module  # float32, CPU, eval(); every weight an nn.Parameter (trainable)
    info: ModelInfo
    input_shape: list[int]  # concrete example shape, batch 1
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool  # whether the original first input's axis 0 is symbolic
