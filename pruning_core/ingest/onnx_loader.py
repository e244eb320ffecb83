"""ONNX -> trainable torch graph: safety checks, onnxslim, onnx2torch (+ our converters), weight promotion,
verification against ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import defs
from onnx2torch import convert
from onnx2torch.node_converters.registry import get_converter
from torch import fx, nn

from pruning_core.errors import ModelRejected, UnsupportedOp
from pruning_core.ingest import converters
from pruning_core.ingest.formats import load_onnx_proto
from pruning_core.ingest.fx_passes import fuse_linear_bias
from pruning_core.ingest.normalize import normalize
from pruning_core.ingest.onnx_graph import (
    default_opset,
    example_shapes,
    graph_inputs,
    graph_outputs,
    has_dynamic_batch,
)
from pruning_core.ingest.safety import check_onnx_safety
from pruning_core.ingest.types import LoadedModel, ModelInfo
from pruning_core.ingest.verify import random_inputs, verify
from pruning_core.macs import count_macs, count_params

assert converters.register_all is not None  # imported for its registrations

# Initializers feeding these onnx2torch modules are hyper-parameters (resize scales, clip bounds,
# pad values), not weights: they stay buffers. Every other float initializer becomes a Parameter.
_NOT_WEIGHT_USERS = ("Resize", "Pad", "Range", "ConstantOfShape", "Clip", "TopK", "Nms", "RoiAlign", "Upsample")


def read_onnx(path: Path, load_data: bool = True) -> onnx.ModelProto:
    """Parse, check for unsafe external data / absurd sizes, then load external data from the model's folder
    (`load_data=False` leaves it on disk; MAC counting then treats those tensors as shape-only)."""
    model = load_onnx_proto(path)
    check_onnx_safety(model, path.parent)
    if load_data and any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def check_ops_supported(model: onnx.ModelProto) -> None:
    """Name the first op without a converter (with its domain and opset) before conversion starts."""
    opsets = {o.domain or "": int(o.version) for o in model.opset_import}
    missing: list[tuple[str, str, int]] = []
    for node in model.graph.node:
        domain = node.domain or ""
        opset = opsets.get(domain, opsets.get("", 0))
        try:
            get_converter(operation_type=node.op_type, version=opset, domain=domain)
        except NotImplementedError:
            if (domain, node.op_type, opset) not in missing:
                missing.append((domain, node.op_type, opset))
    if missing:
        domain, op_type, opset = missing[0]
        try:
            since = defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
            detail = f"version {since} of this op has no converter"
        except Exception:
            detail = "the op is not part of the standard ONNX domain" if domain else "no converter"
        others = ", ".join(f"{d or 'ai.onnx'}::{o} (opset {v})" for d, o, v in missing[1:])
        raise UnsupportedOp(op_type, opset, domain, detail + (f"; also unsupported: {others}" if others else ""))


def promote_weights(module: fx.GraphModule) -> list[str]:
    """Turn float initializer buffers (numel > 1) into nn.Parameters so fine-tuning can train them.

    onnx2torch stores every initializer its converters did not absorb (ViT's class token and position
    embedding, biases of MatMul+Add, LayerNorm scales fed as inputs) as a buffer. Returns the promoted names.
    """
    promoted: list[str] = []
    if not hasattr(module, "initializers"):
        return promoted  # fx only keeps the container when some node reads an initializer
    container = module.get_submodule("initializers")
    for node in module.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith("initializers."):
            continue
        name = str(node.target).split(".", 1)[1]
        tensor = container._buffers.get(name)
        if tensor is None or not tensor.is_floating_point() or tensor.numel() <= 1:
            continue
        users = [type(module.get_submodule(str(u.target))).__name__ for u in node.users if u.op == "call_module"]
        if any(marker in user for user in users for marker in _NOT_WEIGHT_USERS):
            continue
        del container._buffers[name]
        container.register_parameter(name, nn.Parameter(tensor.detach().clone().float(), requires_grad=True))
        promoted.append(name)
    return promoted


def to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """Normalise and convert; every failure becomes `ModelRejected` / `UnsupportedOp`."""
    slim = normalize(model)
    check_ops_supported(slim)
    try:
        module = convert(slim)
    except NotImplementedError as exc:
        raise ModelRejected(f"the ONNX graph uses a feature the torch converter does not support: {exc}") from exc
    except Exception as exc:
        raise ModelRejected(f"converting the ONNX graph to torch failed: {type(exc).__name__}: {exc}") from exc
    promote_weights(module)
    fuse_linear_bias(module)
    module = module.float().eval()
    for param in module.parameters():
        param.requires_grad_(True)
    return module


def ort_reference(model: onnx.ModelProto) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """ONNX Runtime (CPU) on the original, un-normalised graph: the ground truth the user exported.

    The session is created on first use, so conversion errors (which name the op) come first.
    """
    sessions: list[ort.InferenceSession] = []

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        if not sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.log_severity_level = 3
            try:
                sessions.append(
                    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                )
            except Exception as exc:
                raise ModelRejected(f"ONNX Runtime cannot load the model: {exc}") from exc
        session = sessions[0]
        names = [i.name for i in session.get_inputs()]
        try:
            return [np.asarray(o) for o in session.run(None, dict(zip(names, inputs, strict=True)))]
        except Exception as exc:
            raise ModelRejected(f"ONNX Runtime failed to run the model on a random input: {exc}") from exc

    return run


def onnx_info(model: onnx.ModelProto, input_shape: list[int] | None, fmt: str = "onnx") -> ModelInfo:
    from pruning_core.macs import onnx_macs  # local: keep the import graph obvious

    inputs = graph_inputs(model)
    shapes = example_shapes(inputs, input_shape)
    params = sum(
        int(np.prod(t.dims)) for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                           onnx.TensorProto.DOUBLE)
    )
    return ModelInfo(
        format=fmt, opset=default_opset(model), inputs=inputs, outputs=graph_outputs(model),
        params=params, macs=onnx_macs(model, shapes[0]),
    )


def load_onnx(path: Path, input_shape: list[int] | None = None, verify_outputs: bool = True) -> LoadedModel:
    model = read_onnx(path)
    return load_onnx_proto_model(model, input_shape, verify_outputs, ort_reference(model) if verify_outputs else None)


def _macs(module: nn.Module, model: onnx.ModelProto, shapes: list[list[int]], dtypes: list[str]) -> int:
    """Torch-side count (what pruning changes); multi-input graphs fall back to the ONNX count."""
    if len(shapes) == 1:
        return count_macs(module, torch.from_numpy(random_inputs(shapes, dtypes)[0]))
    from pruning_core.macs import onnx_macs

    return onnx_macs(model, shapes[0])


def load_onnx_proto_model(
    model: onnx.ModelProto,
    input_shape: list[int] | None,
    verify_outputs: bool,
    reference: Callable[[list[np.ndarray]], list[np.ndarray]] | None,
    what: str = "ONNX Runtime on the original model",
    fmt: str = "onnx",
) -> LoadedModel:
    """Shared by the ONNX and TorchScript paths (the latter passes its ScriptModule as `reference`)."""
    inputs = graph_inputs(model)
    shapes = example_shapes(inputs, input_shape)
    module = to_torch(model)
    if verify_outputs:
        assert reference is not None, "verification needs a reference runtime"
        verify(module, reference, random_inputs(shapes, [s.dtype for s in inputs]), what)
    info = ModelInfo(
        format=fmt, opset=default_opset(model) if fmt == "onnx" else None, inputs=inputs,
        outputs=graph_outputs(model), params=count_params(module),
        macs=_macs(module, model, shapes, [s.dtype for s in inputs]),
    )
    return LoadedModel(
        module=module, info=info, input_shape=shapes[0], input_names=[s.name for s in inputs],
        output_names=[s.name for s in info.outputs], dynamic_batch=has_dynamic_batch(inputs[0]),
    )
