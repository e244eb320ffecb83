"""run_3d end to end on a tiny residual model trained on digits: FLOPs target met, ONNX with the new input shape."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx2torch
import onnxruntime as ort
import onnxslim
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from test_three_d_models import TinyResNet, one_thread

from pruning_core.data import TrainData
from pruning_core.macs import count_macs
from pruning_core.methods.three_d.run import ThreeDConfig, run_3d
from pruning_core.methods.three_d.sampling import ChainConfig
from pruning_core.spec import PruneSpec

SIZE = 16
__all__ = ["one_thread"]  # the autouse fixture, re-exported so it applies here


def digits(n: int = 400) -> TrainData:
    d = load_digits()
    x = torch.from_numpy(d.images[:n].astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return TrainData(x, torch.from_numpy(d.target[:n].astype(np.int64)), "labelled", f"{n} digits at {SIZE}x{SIZE}")


def pretrained_converted(data: TrainData, steps: int = 120) -> torch.fx.GraphModule:
    """A TinyResNet trained a little, then exported and converted like an uploaded ONNX model."""
    torch.manual_seed(0)
    m = TinyResNet(c=8)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,), generator=gen)
        assert data.labels is not None
        loss = F.cross_entropy(m(data.inputs[idx]), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (data.inputs[:1],), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx2torch.convert(onnxslim.slim(onnx.load_from_string(buf.getvalue())))


def export_and_run(module: torch.nn.Module, shape: list[int]) -> tuple[list[int | str], np.ndarray, np.ndarray]:
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(5))
    buf = io.BytesIO()
    torch.onnx.export(module, (x[:1],), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    return dims, got, want


@pytest.mark.slow  # ~11 s on an idle core, ~45 s when the box is shared
def test_run_3d_meets_the_flops_target_and_exports_with_the_new_input_shape() -> None:
    data = digits()
    model = pretrained_converted(data)
    dense = count_macs(model, data.inputs[:1])
    spec = PruneSpec(method="3d", flops_target=0.4, steps=40, batch_size=32, seed=0,
                     accelerator={"channel_multiple": 2})
    cfg = ThreeDConfig(chains=ChainConfig(depth_steps=2, width_levels=(0.75, 0.5), resolution_levels=(0.75, 0.5),
                                          steps_per_point=8), holdout_points=1, width_grid=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_3d(model, None, [1, 1, SIZE, SIZE], spec, data, None, cfg)
    # The caller's model is never pruned or fine-tuned in place (chains and candidates work on copies).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    p = res.plan3d
    pruned = count_macs(res.module, torch.zeros(res.input_shape))
    assert pruned == p["macs"]["pruned"]
    # Tolerance: the solver accepts real MACs in [budget_floor * budget, budget] = [0.85, 1.0] x 40% of dense.
    assert 0.85 * 0.4 * dense <= pruned <= 0.4 * dense, (pruned / dense, p["depth"], p["width"], p["resolution"])
    # The report contract of DESIGN.md.
    for key in ("depth", "width", "resolution", "input_shape", "samples", "fit_error", "predicted", "achieved"):
        assert key in p, key
    assert p["samples"][0] == {**p["samples"][0], "d": 1.0, "w": 1.0, "r": 1.0, "axis": "dense", "macs": dense}
    assert {s["axis"] for s in p["samples"]} == {"dense", "depth", "width", "resolution"}
    assert all({"d", "w", "r", "macs", "score"} <= set(s) for s in p["samples"])
    assert p["fit_error"]["heldout"]["points"] == 1 and p["model"]["terms"]
    assert p["input_shape"] == res.input_shape and res.input_shape[2] == round(p["resolution"] * SIZE)
    assert 0.0 <= p["achieved"] <= 1.0
    dims, got, want = export_and_run(res.module, res.input_shape)
    assert dims[1:] == res.input_shape[1:] and dims[0] == "batch"
    # ORT vs torch on the same float32 graph: only kernel rounding differs (1e-4 on logits of size ~10).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_resolution_only_shrinks_the_input_and_says_so() -> None:
    data = digits(200)
    model = pretrained_converted(data, steps=10)
    spec = PruneSpec(method="3d", flops_target=0.5, steps=4, batch_size=32, accelerator={"channel_multiple": 2})
    cfg = ThreeDConfig(axes=("resolution",), search="macs")
    res = run_3d(model, None, [1, 1, SIZE, SIZE], spec, data, None, cfg)
    p = res.plan3d
    # MACs scale with H*W: half the MACs -> ~sqrt(0.5) * 16 = 11.3 -> the largest accepted size under it, 10 or 12.
    assert res.input_shape[2] < SIZE and p["inputs_must_be_resized"] and "resize every input" in p["resize_note"]
    assert p["depth"] == 1.0 and p["width"] == 1.0 and p["samples"] == []
    assert p["macs"]["pruned"] <= 0.5 * p["macs"]["dense"]
    dims, got, want = export_and_run(res.module, res.input_shape)
    assert dims[1:] == res.input_shape[1:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
