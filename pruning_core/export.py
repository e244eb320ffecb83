"""Export a (pruned) torch module to ONNX that ONNX Runtime runs, keeping the model's interface.

The pruned model must be a drop-in replacement for the uploaded one: same input/output names, same
dynamic batch axis, valid under `onnx.checker`, and it must actually run on ONNX Runtime. For block and
N:M pruning the zero pattern is the product, so after export we read the initializers back and check
that every zero of every Conv/Linear weight is still an exact zero in the file (constant folding of
BatchNorm scales weights and a MatMul may transpose them, both of which keep zeros exact).

Route: the TorchScript exporter (`dynamo=False`, opset 17 by default) first, because onnx2torch's
modules carry custom ONNX export paths for it; the dynamo exporter (opset >= 18) as fallback.
Then onnxslim clean-up, kept only if ORT outputs, names, the batch axis and the zero pattern survive.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from pruning_core.errors import HwpruneError

log = logging.getLogger(__name__)


class ExportFailed(HwpruneError):
    """The pruned module could not be written as a runnable ONNX model."""


@dataclass
class ExportCheck:
    """Tolerances for the post-export checks."""

    # ORT vs torch: float32 kernels sum in different orders; 1e-3 relative to the output scale covers
    # deep nets (resnet50 differs ~1e-5 relative) while a wrong weight or op gives O(1) differences.
    rtol: float = 1e-3
    # the batch size used to prove the batch axis is really dynamic (a baked reshape fails here)
    probe_batch: int = 2
    seed: int = 0  # random probe input


def export_onnx(
    module: nn.Module,
    path: Path,
    input_shape: list[int],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool = True,
    opset: int = 17,
    slim: bool = True,
    check: ExportCheck | None = None,
    exporters: tuple[str, ...] = ("torchscript", "dynamo"),  # tried in this order
) -> None:
    """Write `module` to `path` as ONNX and prove the file is usable (see module docstring).

    `module` may be an onnx2torch GraphModule or any nn.Module taking one tensor; its train/eval state is
    restored afterwards. Raises `ExportFailed` with the reason when no exporter gives a valid, runnable file.
    """
    check = check or ExportCheck()
    path = Path(path)
    if len(input_names) != 1:
        raise ExportFailed(f"export supports models with exactly one input, this one has {input_names}")
    if not input_shape or any(d <= 0 for d in input_shape):
        raise ExportFailed(f"export needs a concrete input shape like 1,3,224,224, got {input_shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        gen = torch.Generator().manual_seed(check.seed)
        example = torch.randn(*input_shape, generator=gen)
        probe_shape = [check.probe_batch, *input_shape[1:]] if dynamic_batch else list(input_shape)
        probe = torch.randn(*probe_shape, generator=gen)
        with torch.no_grad():
            expected = _first_output(module(probe)).numpy()
        errors: list[str] = []
        model: onnx.ModelProto | None = None
        for exporter in exporters:
            assert exporter in ("torchscript", "dynamo"), f"unknown exporter {exporter!r}"
            dynamo = exporter == "dynamo"
            try:
                candidate = _export(module, example, input_names, output_names, dynamic_batch, opset, dynamo)
                _validate(candidate, module, probe, expected, input_names, output_names, dynamic_batch, check)
                model = candidate
                break
            except Exception as e:  # exporter internals raise anything; keep the reason for the message
                errors.append(f"{exporter} exporter: {type(e).__name__}: {e}")
                log.info("ONNX export attempt failed: %s", errors[-1])
        if model is None:
            raise ExportFailed("could not export the pruned model to ONNX; " + " | ".join(errors))
        if slim:
            model = _maybe_slim(model, module, probe, expected, input_names, output_names, dynamic_batch, check)
        onnx.save(model, str(path))
    finally:
        module.train(was_training)


def _first_output(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return _first_output(next(iter(out.values())))
    raise ExportFailed(f"model output must be a tensor or a sequence of tensors, got {type(out).__name__}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print pages of warnings (TracerWarning, deprecation); they are not the user's problem."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export(
    module: nn.Module, example: torch.Tensor, input_names: list[str], output_names: list[str],
    dynamic_batch: bool, opset: int, dynamo: bool,
) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp, _quiet(), torch.no_grad():
        f = Path(tmp) / "m.onnx"
        if dynamo:
            dyn = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(
                module, (example,), str(f), dynamo=True, opset_version=max(opset, 18),
                input_names=input_names, output_names=output_names, dynamic_shapes=dyn,
                external_data=False,
            )
        else:
            axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
            torch.onnx.export(
                module, (example,), str(f), dynamo=False, opset_version=opset,
                input_names=input_names, output_names=output_names, dynamic_axes=axes,
                do_constant_folding=True,
            )
        return onnx.load(str(f))


def _validate(
    model: onnx.ModelProto, module: nn.Module, probe: torch.Tensor, expected: np.ndarray,
    input_names: list[str], output_names: list[str], dynamic_batch: bool, check: ExportCheck,
) -> None:
    """Raise with a reason unless `model` is checker-valid, keeps the interface, runs on ORT and agrees."""
    onnx.checker.check_model(model, full_check=True)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != input_names or got_out[: len(output_names)] != output_names:
        raise ExportFailed(f"names changed: inputs {got_in} outputs {got_out}, want {input_names} {output_names}")
    if dynamic_batch:
        for vi in [model.graph.input[0], model.graph.output[0]]:
            d0 = vi.type.tensor_type.shape.dim[0]
            if d0.HasField("dim_value"):
                raise ExportFailed(f"batch axis of {vi.name!r} is fixed to {d0.dim_value}, wanted dynamic")
    got = run_onnx(model, probe.numpy())
    if got.shape != expected.shape:
        raise ExportFailed(f"ONNX output shape {got.shape} != torch {expected.shape}")
    err = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max()) or 1.0
    if err > check.rtol * scale:
        raise ExportFailed(f"ONNX Runtime output differs from torch by {err:.3g} (scale {scale:.3g})")
    missing = zero_pattern_mismatches(module, model)
    if missing:
        raise ExportFailed(f"zero pattern of {len(missing)} weight(s) not preserved, e.g. {missing[:3]}")


def _maybe_slim(
    model: onnx.ModelProto, module: nn.Module, probe: torch.Tensor, expected: np.ndarray,
    input_names: list[str], output_names: list[str], dynamic_batch: bool, check: ExportCheck,
) -> onnx.ModelProto:
    """onnxslim removes Identity/dead nodes and folds constants; keep its output only if nothing we promise broke."""
    try:
        import onnxslim

        with _quiet():
            slimmed = onnxslim.slim(model)
        assert isinstance(slimmed, onnx.ModelProto), "onnxslim returned no model"
        _validate(slimmed, module, probe, expected, input_names, output_names, dynamic_batch, check)
        return slimmed
    except Exception as e:  # slim is an optimisation; the exported model is already valid
        log.info("onnxslim result rejected, keeping the exporter's graph: %s", e)
        return model


def run_onnx(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """First output of `model` on `x` with ORT's CPU provider (one thread: this is a correctness check)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.asarray(out)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes by name, plus Identity aliases (the exporter dedups equal tensors)."""
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    vals[node.output[0]] = numpy_helper.to_array(a.t)
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in vals:
            vals[node.output[0]] = vals[node.input[0]]
    return vals


def _keeps_zeros(onnx_zeros: np.ndarray, torch_zeros: np.ndarray) -> bool:
    """Every torch zero is an ONNX zero. Extra ONNX zeros are allowed only in a partly non-zero tensor:
    folding a BatchNorm with gamma=0 legitimately zeroes a whole output channel, but an all-zero tensor
    must not stand in for a weight that had non-zeros."""
    if not bool(onnx_zeros[torch_zeros].all()):
        return False
    return bool(torch_zeros.all()) or not bool(onnx_zeros.all())


def zero_pattern_mismatches(module: nn.Module, model: onnx.ModelProto | Path) -> list[str]:
    """Names of Conv/Linear weights whose exact zero pattern is not found in the ONNX file.

    A weight matches an ONNX tensor with the same name, or (when the exporter renamed it while folding
    BatchNorm or transposing a MatMul weight) any tensor of the same or transposed shape that keeps
    all its zeros. Weights without zeros are skipped: there is no pattern to lose.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    tensors = _initializers(model)
    masks_by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for arr in tensors.values():
        if arr.ndim >= 2:
            masks_by_shape.setdefault(tuple(arr.shape), []).append(arr == 0)
    missing: list[str] = []
    for name, mod in module.named_modules():
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        w = mod.weight.detach().cpu().numpy()
        zmask = w == 0
        if not zmask.any():
            continue
        pname = f"{name}.weight"
        if pname in tensors and tensors[pname].shape == w.shape:
            if not _keeps_zeros(tensors[pname] == 0, zmask):
                missing.append(pname)
            continue
        candidates = [*masks_by_shape.get(w.shape, [])]
        if w.ndim == 2:
            candidates += [m.T for m in masks_by_shape.get(w.shape[::-1], [])]
        if not any(_keeps_zeros(m, zmask) for m in candidates):
            missing.append(pname)
    return missing
