"""Format detection by content, refusal of unsafe or broken uploads, inspection, and output verification."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pruning_core.errors import ModelRejected
from pruning_core.ingest import detect_format, inspect_model, load_model
from pruning_core.ingest.onnx_loader import ort_reference, to_torch
from pruning_core.ingest.verify import compare, random_inputs, verify
from pruning_core.macs import count_macs, count_params, onnx_macs


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _export_tiny(path: Path, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet().eval()
    torch.onnx.export(
        net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17, input_names=["image"],
        output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}},
    )
    return net


def _linear_model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_detects_onnx_and_torchscript_by_content_not_extension(tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.pt"  # misleading extensions on purpose
    net = _export_tiny(onnx_path)
    ts_path = tmp_path / "model.onnx"
    torch.jit.trace(net, torch.randn(1, 3, 8, 8)).save(str(ts_path))
    assert detect_format(onnx_path) == "onnx"
    assert detect_format(ts_path) == "torchscript"


def test_refuses_random_bytes_and_text(tmp_path: Path) -> None:
    for i, payload in enumerate([np.random.default_rng(0).bytes(4096), b"hello, I am not a model\n", b""]):
        path = tmp_path / f"junk{i}.onnx"
        path.write_bytes(payload)
        with pytest.raises(ModelRejected, match="not an ONNX or TorchScript model"):
            detect_format(path)
        with pytest.raises(ModelRejected, match="not an ONNX or TorchScript model"):
            inspect_model(path)


def test_refuses_torch_save_checkpoint_without_unpickling(tmp_path: Path) -> None:
    # A torch.save zip carries a pickle that could run code on load: refused before anything reads it.
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(ModelRejected, match="not TorchScript"):
        load_model(path, input_shape=[1, 3, 8, 8])


def test_refuses_zip_without_model(tmp_path: Path) -> None:
    path = tmp_path / "archive.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    with pytest.raises(ModelRejected, match="not TorchScript"):
        detect_format(path)


def test_refuses_external_data_outside_model_folder(tmp_path: Path) -> None:
    model = _linear_model(np.ones((4, 3), np.float32))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 48)
    inner = tmp_path / "upload"
    inner.mkdir()
    onnx.external_data_helper.convert_model_to_external_data(model, location="../secret.bin", size_threshold=0)
    path = inner / "model.onnx"
    # save without re-writing the data: write the proto as is (its location points outside `upload/`)
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelRejected, match="outside the model's folder"):
        inspect_model(path)
    with pytest.raises(ModelRejected, match="outside the model's folder"):
        load_model(path)


def test_external_data_inside_folder_is_loaded(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    model = _linear_model(weight)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.data", size_threshold=0)
    loaded = load_model(path)
    linear = next(m for m in loaded.module.modules() if isinstance(m, nn.Linear))
    np.testing.assert_array_equal(linear.weight.detach().numpy(), weight.T)


def test_refuses_missing_external_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(_linear_model(np.ones((4, 3), np.float32)), str(path), save_as_external_data=True,
              location="model.data", size_threshold=0)
    (tmp_path / "model.data").unlink()
    with pytest.raises(ModelRejected, match="missing"):
        inspect_model(path)


def test_refuses_absurd_tensor_size(tmp_path: Path) -> None:
    model = _linear_model(np.ones((4, 3), np.float32))
    tensor = model.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([2**20, 2**20])  # 2**40 elements declared, 48 bytes present
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelRejected, match="more than the"):
        inspect_model(path)


def test_refuses_truncated_raw_data(tmp_path: Path) -> None:
    model = _linear_model(np.ones((4, 3), np.float32))
    tensor = model.graph.initializer[0]
    tensor.raw_data = tensor.raw_data[:20]
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelRejected, match="corrupt"):
        load_model(path)


def test_inspect_onnx_reports_interface_params_macs(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    net = _export_tiny(path)
    info = inspect_model(path, input_shape=[1, 3, 8, 8])
    assert info.format == "onnx" and info.opset == 17
    assert info.inputs[0].name == "image" and info.inputs[0].shape == ["n", 3, 8, 8]
    assert info.outputs[0].name == "logits" and info.outputs[0].dtype == "float32"
    assert info.params == count_params(net)
    # conv: 8*3*3*3 per pixel * 64 pixels; fc: 8*5
    assert info.macs == 8 * 27 * 64 + 40 == count_macs(net, torch.randn(1, 3, 8, 8))
    as_dict = info.to_dict()
    assert as_dict["inputs"][0] == {"name": "image", "shape": ["n", 3, 8, 8], "dtype": "float32"}


def test_load_keeps_names_dynamic_batch_and_trains(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _export_tiny(path)
    loaded = load_model(path, input_shape=[1, 3, 8, 8])
    assert loaded.input_names == ["image"] and loaded.output_names == ["logits"]
    assert loaded.dynamic_batch and loaded.input_shape == [1, 3, 8, 8]
    assert not loaded.module.training
    params = list(loaded.module.parameters())
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    # a real training step changes every weight: gradients reach all of them
    out = loaded.module(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 5)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_input_shape_must_match_fixed_dims(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _export_tiny(path)
    with pytest.raises(ModelRejected, match="contradicts"):
        load_model(path, input_shape=[1, 4, 8, 8])
    with pytest.raises(ModelRejected, match="dims"):
        inspect_model(path, input_shape=[1, 3, 8])


def test_symbolic_spatial_dims_need_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    with pytest.raises(ModelRejected, match="pass input_shape"):
        load_model(path)
    assert load_model(path, input_shape=[1, 3, 12, 12]).input_shape == [1, 3, 12, 12]
    # MACs follow the example shape: 4x the pixels of 8x8 for the convolution, the same for the Linear.
    assert inspect_model(path, input_shape=[1, 3, 16, 16]).macs == 8 * 27 * 256 + 40


def test_verify_refuses_a_graph_that_disagrees(tmp_path: Path) -> None:
    # Two real models with the same interface but different weights: verifying one against the other's
    # ONNX Runtime session must fail with a message that says what disagreed.
    path_a, path_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _export_tiny(path_a, seed=0)
    _export_tiny(path_b, seed=1)
    module_a = to_torch(onnx.load(str(path_a)))
    inputs = random_inputs([[1, 3, 8, 8]], ["float32"])
    agreement = verify(module_a, ort_reference(onnx.load(str(path_a))), inputs, "ONNX Runtime")
    assert agreement.ok and agreement.relative < 1e-5
    with pytest.raises(ModelRejected, match="disagrees with ONNX Runtime"):
        verify(module_a, ort_reference(onnx.load(str(path_b))), inputs, "ONNX Runtime")


def test_onnx_macs_counts_conv_transpose_and_matmul() -> None:
    # ConvTranspose (cost on input pixels) followed by a batched MatMul of two activations.
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2]),
         helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 1, 3, 2]),
         helper.make_node("MatMul", ["y", "yt"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 5, 5])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    deconv = nn.ConvTranspose2d(4, 2, 3, stride=2, bias=False)
    x = torch.randn(1, 4, 5, 5)
    y = deconv(x)  # (1, 2, 11, 11)
    side = y.shape[-1]
    expected = count_macs(deconv, x) + 2 * side * side * side
    assert onnx_macs(model, [1, 4, 5, 5]) == expected


class OpsMix(nn.Module):
    """Ops whose ONNX form changed between opsets 13 and 17 (Squeeze/Unsqueeze/Split axes, ReduceMean)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        a, b = h.chunk(2, dim=1)  # Split
        h = torch.cat([b, a], dim=1)  # channel swap, like a shuffle
        pooled = h.mean(dim=(2, 3), keepdim=True).squeeze(-1).squeeze(-1)  # ReduceMean + Squeeze
        return torch.softmax(self.fc(pooled).unsqueeze(1), dim=-1).flatten(1)


@pytest.mark.parametrize("opset", [13, 15, 17])
def test_torchscript_exporter_opsets_13_to_17(tmp_path: Path, opset: int) -> None:
    torch.manual_seed(0)
    net = OpsMix().eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["p"], dynamic_axes={"x": {0: "b"}, "p": {0: "b"}})
    loaded = load_model(path)
    assert loaded.info.opset == opset
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        # float32 on both sides, BN folded into the conv by the exporter: 1e-4 is a wide margin
        torch.testing.assert_close(loaded.module(x), net(x), rtol=1e-4, atol=1e-6)


def test_initializers_listed_as_inputs(tmp_path: Path) -> None:
    # Older exporters (keep_initializers_as_inputs=True) list every weight as a graph input too:
    # those are weights, not inputs the user feeds.
    path = tmp_path / "m.onnx"
    torch.manual_seed(0)
    net = TinyNet().eval()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=13,
                      input_names=["image"], keep_initializers_as_inputs=True)
    assert len(onnx.load(str(path)).graph.input) > 1
    info = inspect_model(path)
    assert [i.name for i in info.inputs] == ["image"]
    loaded = load_model(path)
    assert loaded.input_names == ["image"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), rtol=1e-4, atol=1e-6)


def test_compare_tolerance_edges() -> None:
    ref = np.array([[10.0, -20.0]], np.float32)
    # within 1e-3 of the output scale (20): ok; just beyond: refused
    assert compare([ref + 0.019], [ref]).ok
    assert not compare([ref + 0.025], [ref]).ok
    assert not compare([ref.reshape(2, 1)], [ref]).ok  # shape changed
    assert not compare([np.full_like(ref, np.nan)], [ref]).ok  # NaN never agrees
    # the worst output decides
    assert not compare([ref, ref * 2], [ref, ref]).ok
