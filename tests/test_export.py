"""export_onnx: interface kept, checker-valid, runs on ORT, and block / N:M zero patterns survive exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx2torch
import onnxslim
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from pruning_core.errors import HwpruneError
from pruning_core.export import export_onnx, run_onnx, zero_pattern_mismatches

# ORT vs torch float32: different summation order; outputs here are O(1), observed error ~1e-6.
ATOL = 1e-4


def _block_zero(w: torch.Tensor, r: int, c: int, every: int) -> None:
    """Zero every `every`-th r x c tile of the (out, in*kh*kw) view, ragged edge tiles included."""
    v = w.data.reshape(w.shape[0], -1)
    k = 0
    for i in range(0, v.shape[0], r):
        for j in range(0, v.shape[1], c):
            if k % every == 0:
                v[i : i + r, j : j + c] = 0
            k += 1


def _nm_zero(w: torch.Tensor, n: int, m: int) -> None:
    """Keep the n largest of every m consecutive input weights of a Linear weight [out, in]."""
    v = w.data.reshape(w.shape[0], -1, m)
    drop = v.abs().argsort(-1)[..., : m - n]
    v.scatter_(-1, drop, 0.0)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)  # 10 x 27 view: ragged 4x4 tiles on both edges
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10 * 6 * 6, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _sparse_small() -> Small:
    torch.manual_seed(0)
    m = Small().eval()
    with torch.no_grad():  # non-trivial BN so folding really rescales the conv weight
        m.bn.weight.uniform_(0.5, 2.0)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.running_mean.normal_()
    _block_zero(m.conv.weight, 4, 4, every=2)
    _nm_zero(m.fc.weight, 2, 4)
    return m


def _weights_of(model: onnx.ModelProto, op: str) -> list[np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == op]


def test_plain_module_keeps_interface_and_zero_pattern(tmp_path: Path) -> None:
    m = _sparse_small()
    out = tmp_path / "m.onnx"
    export_onnx(m, out, [1, 3, 8, 8], ["pixels"], ["scores"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert [o.name for o in model.graph.output] == ["scores"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "batch axis must stay symbolic"
    # runs on ORT at a batch size other than the export one and matches torch
    x = torch.randn(5, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(out, x.numpy()), m(x).detach().numpy(), atol=ATOL)
    # zero pattern read back from the file: BN is folded into the conv (weights rescaled, zeros kept)
    (conv_w,) = _weights_of(model, "Conv")
    (fc_w,) = _weights_of(model, "Gemm")
    assert not np.allclose(conv_w, m.conv.weight.detach().numpy()), "BN folding expected to rescale weights"
    np.testing.assert_array_equal(conv_w == 0, m.conv.weight.detach().numpy() == 0)
    np.testing.assert_array_equal(fc_w == 0, m.fc.weight.detach().numpy() == 0)
    assert (fc_w.reshape(7, -1, 4) != 0).sum(-1).max() == 2, "exactly 2 of every 4 inputs kept"
    assert zero_pattern_mismatches(m, model) == []


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_onnx2torch_graph_with_parametrized_masks(tmp_path: Path) -> None:
    """The pipeline's case: an onnx2torch GraphModule whose weights carry mask parametrizations."""
    torch.manual_seed(1)
    src = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    first = tmp_path / "src.onnx"
    torch.onnx.export(src, (torch.randn(1, 3, 12, 12),), str(first), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.save(onnxslim.slim(onnx.load(str(first))), str(first))
    g = onnx2torch.convert(str(first)).eval()
    convs = [mod for mod in g.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 2
    w = convs[1].weight  # 16 x 72 view, 4x4 tiles
    mask = torch.ones_like(w).reshape(16, -1)
    mask[0:4, 0:8] = 0
    mask[8:12, 68:72] = 0
    parametrize.register_parametrization(convs[1], "weight", _Mask(mask.reshape(w.shape)))
    out = tmp_path / "pruned.onnx"
    export_onnx(g, out, [1, 3, 12, 12], ["input"], ["logits"])
    model = onnx.load(str(out))
    x = torch.randn(3, 3, 12, 12)
    np.testing.assert_allclose(run_onnx(out, x.numpy()), g(x).detach().numpy(), atol=ATOL)
    conv_ws = _weights_of(model, "Conv")
    np.testing.assert_array_equal(conv_ws[1].reshape(16, -1) == 0, mask.numpy() == 0)
    assert zero_pattern_mismatches(g, model) == []


def test_transposed_matmul_weight_pattern_found(tmp_path: Path) -> None:
    """Linear on a 3-D input exports as MatMul with a transposed, renamed weight; the N:M pattern survives."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 4)).eval()
    _nm_zero(m[0].weight, 2, 4)
    out = tmp_path / "seq.onnx"
    export_onnx(m, out, [1, 6, 16], ["tokens"], ["y"])
    x = torch.randn(2, 6, 16)
    np.testing.assert_allclose(run_onnx(out, x.numpy()), m(x).detach().numpy(), atol=ATOL)
    assert zero_pattern_mismatches(m, out) == []


@pytest.mark.slow  # torch.export tracing: ~10 s CPU, 30 s+ on a loaded machine
def test_dynamo_exporter_path_keeps_the_contract(tmp_path: Path) -> None:
    """The fallback exporter (torch.export, opset 18) must give the same guarantees."""
    m = _sparse_small()
    out = tmp_path / "dyn.onnx"
    export_onnx(m, out, [1, 3, 8, 8], ["pixels"], ["scores"], exporters=("dynamo",))
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in model.graph.input] == ["pixels"] and [o.name for o in model.graph.output] == ["scores"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(out, x.numpy()), m(x).detach().numpy(), atol=ATOL)
    assert zero_pattern_mismatches(m, model) == []


def test_mismatch_detected_when_a_zero_is_lost(tmp_path: Path) -> None:
    m = _sparse_small()
    out = tmp_path / "m.onnx"
    export_onnx(m, out, [1, 3, 8, 8], ["x"], ["y"])
    model = onnx.load(str(out))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.shape == (7, 360):  # the Gemm weight: put a value back into one pruned slot
            arr = arr.copy()
            idx = np.argwhere(arr == 0)[0]
            arr[tuple(idx)] = 0.5
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    assert zero_pattern_mismatches(m, model) == ["fc.weight"]


def test_fixed_batch_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "fixed.onnx"
    export_onnx(_sparse_small(), out, [2, 3, 8, 8], ["x"], ["y"], dynamic_batch=False)
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2


def test_unexportable_module_is_a_user_error(tmp_path: Path) -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "not a tensor"

    with pytest.raises(HwpruneError, match="tensor"):
        export_onnx(Bad(), tmp_path / "bad.onnx", [1, 4], ["x"], ["y"])
