"""TorchScript uploads: traced and scripted archives go through the ONNX path and are verified against
the ScriptModule itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.errors import ModelRejected
from pruning_core.ingest import inspect_model, load_model
from pruning_core.macs import count_macs

SHAPE = [1, 3, 16, 16]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(image))).mean((2, 3)))


class PinnedBatch(SmallCNN):
    """A trace of `view(1, -1)` bakes batch 1 into the graph."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(image))).mean((2, 3)).view(1, -1))


def _net() -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN()
    with torch.no_grad():  # non-trivial BN statistics so a BN conversion mistake would show
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_loads_and_matches_script_module(tmp_path: Path, how: str) -> None:
    net = _net()
    path = tmp_path / "model.pt"
    scripted = torch.jit.trace(net, torch.randn(SHAPE)) if how == "trace" else torch.jit.script(net)
    scripted.save(str(path))
    loaded = load_model(path, input_shape=SHAPE)
    assert loaded.info.format == "torchscript" and loaded.info.opset is None
    assert loaded.input_names == ["image"]  # the forward argument's name survives
    assert loaded.dynamic_batch and loaded.input_shape == SHAPE
    # Batch 3 (not the example batch) still matches the original module. Both are float32 CPU kernels
    # in a different order (BN folded into the conv by the exporter): 1e-4 is ~100x the observed error.
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in loaded.module.parameters())
    assert any(isinstance(m, nn.Linear) for m in loaded.module.modules())
    assert loaded.info.macs == count_macs(net, torch.randn(SHAPE))


def test_torchscript_needs_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(_net()).save(str(path))
    with pytest.raises(ModelRejected, match="needs input_shape"):
        load_model(path)
    with pytest.raises(ModelRejected, match="needs input_shape"):
        inspect_model(path)


def test_torchscript_wrong_shape_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(_net()).save(str(path))
    with pytest.raises(ModelRejected, match=r"fails on an input of shape \[1, 5, 16, 16\]"):
        load_model(path, input_shape=[1, 5, 16, 16])


def test_trace_with_pinned_batch_is_not_dynamic(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.trace(PinnedBatch().eval(), torch.randn(SHAPE)).save(str(path))
    loaded = load_model(path, input_shape=SHAPE)
    assert not loaded.dynamic_batch
    assert loaded.input_shape == SHAPE


def test_inspect_torchscript(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "model.pt"
    torch.jit.script(net).save(str(path))
    info = inspect_model(path, input_shape=SHAPE)
    assert info.format == "torchscript"
    assert info.inputs[0].name == "image" and info.inputs[0].shape == SHAPE
    assert info.outputs[0].shape == [1, 4]
    assert info.params == sum(p.numel() for p in net.parameters())
    assert info.macs == count_macs(net, torch.randn(SHAPE)) == 8 * 27 * 256 + 32
