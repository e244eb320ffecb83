"""TorchScript -> the ONNX path: load the ScriptModule, export it to ONNX in memory with the TorchScript
exporter, then convert like any ONNX upload, so every model is one kind of graph downstream.
Verification compares the final torch graph with the ScriptModule itself, not with the intermediate ONNX.

`torch.jit.load` only deserialises TorchScript's own types (its unpickler refuses arbitrary globals);
`formats.detect_format` has already refused zips that are not TorchScript archives.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from pruning_core.errors import ModelRejected
from pruning_core.ingest.formats import detect_format
from pruning_core.ingest.onnx_loader import load_onnx_proto_model
from pruning_core.ingest.types import LoadedModel, ModelInfo, TensorSpec
from pruning_core.ingest.verify import as_list, compare, random_inputs
from pruning_core.macs import count_macs, count_params

# Opset for the in-memory export: the newest the TorchScript exporter and our converters both handle well.
EXPORT_OPSET = 17
NEEDS_SHAPE = "a TorchScript model needs input_shape (e.g. 1,3,224,224): TorchScript does not record it"


def load_script(path: Path) -> torch.jit.ScriptModule:
    if detect_format(path) != "torchscript":
        raise ModelRejected("not a TorchScript archive")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelRejected(f"torch.jit.load failed: {type(exc).__name__}: {exc}") from exc
    return module.float().eval()


def input_name(script: torch.jit.ScriptModule) -> str:
    """The forward argument's name, so the exported model keeps what the user called its input."""
    try:
        args = [a.name for a in script.forward.schema.arguments][1:]  # type: ignore[attr-defined]  # drop `self`
    except Exception:
        args = []
    if len(args) != 1:
        raise ModelRejected(f"only single-input TorchScript models are supported (forward takes {args or 'unknown'})")
    name = args[0]
    return name if name.isidentifier() else "input"


def _check_shape(input_shape: list[int] | None) -> list[int]:
    if not input_shape:
        raise ModelRejected(NEEDS_SHAPE)
    if any(int(d) <= 0 for d in input_shape):
        raise ModelRejected(f"input_shape {input_shape} must be positive")
    return [int(d) for d in input_shape]


def _run(script: torch.jit.ScriptModule, x: torch.Tensor) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            return as_list(script(x))
    except Exception as exc:
        raise ModelRejected(f"the TorchScript model fails on an input of shape {list(x.shape)}: {exc}") from exc


def _export(script: torch.jit.ScriptModule, x: torch.Tensor, name: str, n_out: int, dynamic: bool) -> onnx.ModelProto:
    outputs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in [name, *outputs]} if dynamic else None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                script,
                (x,),
                buffer,  # type: ignore[arg-type]  # a BytesIO works: the model never touches disk
                dynamo=False,
                opset_version=EXPORT_OPSET,
                input_names=[name],
                output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
            )
    except Exception as exc:
        raise ModelRejected(f"exporting the TorchScript model to ONNX failed: {type(exc).__name__}: {exc}") from exc
    return onnx.load_model_from_string(buffer.getvalue())


def _batch_is_free(script: torch.jit.ScriptModule, model: onnx.ModelProto, shape: list[int]) -> bool:
    """A trace may bake batch 1 into reshapes: trust a dynamic batch only if batch 2 still matches the script."""
    import onnxruntime as ort

    x2 = torch.from_numpy(random_inputs([[2, *shape[1:]]], ["float32"], seed=1)[0])
    try:
        want = as_list(script(x2))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: x2.numpy()})]
    except Exception:
        return False
    return compare(got, want).ok


def load_torchscript(path: Path, input_shape: list[int] | None, verify_outputs: bool = True) -> LoadedModel:
    shape = _check_shape(input_shape)
    script = load_script(path)
    x = torch.from_numpy(random_inputs([shape], ["float32"])[0])
    n_out = len(_run(script, x))
    name = input_name(script)
    model = _export(script, x, name, n_out, dynamic=True)
    dynamic = _batch_is_free(script, model, shape)
    if not dynamic:
        model = _export(script, x, name, n_out, dynamic=False)

    def reference(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return _run(script, torch.from_numpy(inputs[0]))

    # The ONNX graph declares batch 1 when the trace pinned it; the example shape is still the user's.
    loaded = load_onnx_proto_model(
        model, shape if dynamic else None, verify_outputs, reference, "the original TorchScript module",
        fmt="torchscript",
    )
    if not dynamic:
        loaded.input_shape = shape
    return loaded


def inspect_torchscript(path: Path, input_shape: list[int] | None) -> ModelInfo:
    """Load the ScriptModule (cheap compared with conversion) and count on it directly."""
    shape = _check_shape(input_shape)
    script = load_script(path)
    x = torch.from_numpy(random_inputs([shape], ["float32"])[0])
    outputs = _run(script, x)
    try:
        macs = count_macs(script, x)
    except Exception:  # FlopCounterMode cannot see inside some scripted ops: report what it can
        macs = 0
    return ModelInfo(
        format="torchscript", opset=None, inputs=[TensorSpec(input_name(script), list(shape), "float32")],
        outputs=[
            TensorSpec("output" if len(outputs) == 1 else f"output_{i}", list(o.shape), str(o.dtype))
            for i, o in enumerate(outputs)
        ],
        params=count_params(script), macs=macs,
    )
