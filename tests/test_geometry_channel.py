"""Channel geometry through Torch-Pruning: coupled groups, physical removal, multiples, converted graphs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import onnx
import onnx2torch
import onnxslim
import pytest
import torch
import torchvision
from torch import nn

from pruning_core.accelerators import BUILTIN_PROFILES, AcceleratorProfile
from pruning_core.geometry import ChannelUnit, PruningPlan, build_plan
from pruning_core.geometry.channel import reshape_target_after
from pruning_core.ingest import load_model

CPU = BUILTIN_PROFILES["cpu"]  # channel_multiple 8


class Coupled(nn.Module):
    """Residual add, depthwise conv, concat and a grouped conv: every coupling Torch-Pruning must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.expand = nn.Conv2d(32, 48, 1)
        self.bn1 = nn.BatchNorm2d(48)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)  # depthwise: coupled to `expand`
        self.project = nn.Conv2d(48, 32, 1)  # residual: coupled to `stem`
        self.bn2 = nn.BatchNorm2d(32)
        self.left = nn.Conv2d(32, 32, 3, padding=1)
        self.side = nn.Conv2d(32, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(56)  # after the concat of `left` and `side`
        self.head = nn.Conv2d(56, 40, 1)
        self.pre = nn.Conv2d(3, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 32, 3, padding=1, groups=4)  # grouped: its channels are kept
        self.fc = nn.Linear(40 + 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn0(self.stem(x)))
        b = torch.relu(self.bn1(self.expand(a)))
        a = a + self.bn2(self.project(torch.relu(self.dw(b))))
        c = torch.relu(self.bn3(torch.cat([self.left(a), self.side(a)], 1)))
        g = self.gconv(torch.relu(self.pre(x)))
        return self.fc(torch.cat([torch.relu(self.head(c)).mean((2, 3)), g.mean((2, 3))], 1))


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running stats and affine params, so a wrongly removed channel changes the output."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune_and_compare(plan: PruningPlan, model: nn.Module, x: torch.Tensor, hard: list[torch.Tensor]) -> nn.Module:
    """Masked (zeroed channels) and physically pruned models must compute the same function."""
    plan.attach()
    plan.set_masks(hard)
    with torch.no_grad():
        y_masked = model(x)
    dense_params = _params(model)
    pruned = plan.finalize(hard)
    with torch.no_grad():
        y_pruned = pruned(x)
    assert y_pruned.shape == y_masked.shape
    # float32 sums over different channel counts: differences are round-off, far below output scale
    assert torch.allclose(y_pruned, y_masked, rtol=1e-4, atol=1e-4), (y_pruned - y_masked).abs().max()
    assert _params(pruned) < dense_params
    return pruned


def test_coupled_groups_and_physical_removal() -> None:
    torch.manual_seed(0)
    model = Coupled().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    plan = build_plan(model, x, "channel", CPU)
    units = {u.name: u for u in plan.units}
    assert isinstance(units["stem"], ChannelUnit)
    # residual: stem and project share channels; depthwise follows expand; the concat BN is split by roots
    assert set(units["stem"].layer_names) == {"stem", "project"}
    assert set(units["expand"].layer_names) == {"expand", "dw"}
    assert set(units) == {"stem", "expand", "left", "side", "head", "pre", "gconv"}
    rec = {r.name: r for r in plan.layers}
    assert not rec["fc"].prunable and "classes" in rec["fc"].reason
    # grouped conv (4 groups): channels at the same index of every conv group are one pruning group
    pre, gconv = units["pre"], units["gconv"]
    assert isinstance(pre, ChannelUnit) and isinstance(gconv, ChannelUnit)
    assert pre.num_groups == 4 and torch.equal(pre.comp_of_root, torch.arange(16) % 4)
    assert gconv.num_groups == 8 and torch.equal(gconv.comp_of_root, torch.arange(32) % 8)
    assert pre.channel_multiple == gconv.channel_multiple == 2  # 2 ties x 4 channels = 8 channels
    hard = plan.select(plan.group_norms(), 0.5, "uniform", 0.05)
    for u, m in zip(plan.units, hard, strict=True):
        assert isinstance(u, ChannelUnit)
        k = u.kept_channels(m)
        assert k % 8 == 0 or k == u.channels, (u.name, k)
        assert abs(k - 0.5 * u.channels) <= 4  # nearest multiple of 8
    pruned = _prune_and_compare(plan, model, x, hard)
    assert pruned(torch.randn(3, 3, 8, 8)).shape == (3, 10)
    assert pruned.stem.out_channels == pruned.project.out_channels == pruned.bn0.num_features == 16
    assert pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.groups == pruned.expand.out_channels
    assert pruned.bn3.num_features == pruned.left.out_channels + pruned.side.out_channels
    assert pruned.pre.out_channels == 8 and pruned.gconv.weight.shape == (16, 2, 3, 3)
    assert pruned.gconv.groups == 4
    assert pruned.fc.out_features == 10
    for r in plan.layers:
        if r.prunable:
            assert r.pruned_shape is not None and r.pruned_shape[0] == r.kept and r.kept % 8 == 0


def test_group_norms_cover_every_coupled_out_channel_param() -> None:
    torch.manual_seed(1)
    model = Coupled().eval()
    plan = build_plan(model, torch.randn(1, 3, 8, 8), "channel", CPU)
    unit = next(u for u in plan.units if u.name == "stem")
    parts = [model.stem.weight.flatten(1), model.bn0.weight[:, None], model.bn0.bias[:, None],
             model.project.weight.flatten(1), model.project.bias[:, None], model.bn2.weight[:, None],
             model.bn2.bias[:, None]]
    expected = torch.cat(parts, 1)
    assert torch.allclose(unit.group_norms(), expected.norm(dim=1), atol=1e-5)
    assert torch.equal(unit.group_sizes(), torch.full((32,), float(expected.shape[1])))


@pytest.mark.parametrize("min_keep", [0.05, 0.3])
def test_global_budget_within_one_multiple_and_min_keep_at_097(min_keep: float) -> None:
    torch.manual_seed(2)
    model = Coupled().eval()
    plan = build_plan(model, torch.randn(1, 3, 8, 8), "channel", CPU)
    units = [u for u in plan.units if isinstance(u, ChannelUnit)]
    total = sum(u.num_groups for u in units)
    hard = plan.select(plan.group_norms(), 0.5, "global", 0.05)
    # budget in groups (a grouped conv's group spans several channels); off by at most one multiple
    assert abs(sum(int(m.sum()) for m in hard) - 0.5 * total) <= max(u.channel_multiple for u in units)
    hard = plan.select(plan.group_norms(), 0.97, "global", min_keep)
    for u, m in zip(units, hard, strict=True):
        k = u.kept_channels(m)
        assert k >= min(u.channels, math.ceil(min_keep * u.channels / 8) * 8), (u.name, k)
        assert k % 8 == 0 or k == u.channels


def test_soft_channel_masks_get_gradients_and_keep_override() -> None:
    torch.manual_seed(3)
    model = Coupled().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = build_plan(model, x, "channel", CPU, overrides={"side": "keep"})
    assert "side" not in {u.name for u in plan.units}
    assert {r.name: r for r in plan.layers}["side"].reason.startswith("override: keep")
    plan.attach()
    soft = [torch.full((u.num_groups,), 0.7, requires_grad=True) for u in plan.units]
    plan.set_masks(soft)
    model(x).square().sum().backward()
    for u, s in zip(plan.units, soft, strict=True):
        assert s.grad is not None and s.grad.abs().sum() > 0, u.name


def _converted(name: str, x: torch.Tensor) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    # onnxslim folds the Identity-shared initializers onnx2torch cannot read (the ingest helper does the same)
    return onnx2torch.convert(onnxslim.slim(onnx.load_from_string(buf.getvalue())))


def test_converted_resnet18_channel_pruned_runs() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 3, 64, 64)
    model = _converted("resnet18", x)
    plan = build_plan(model, x, "channel", CPU)
    rec = {r.name: r for r in plan.layers}
    assert sum(r.prunable for r in plan.layers) == len(plan.layers) - 1  # everything but the classifier
    assert not rec["fc/Gemm"].prunable
    hard = plan.select(plan.group_norms(), 0.5, "uniform", 0.05)
    pruned = _prune_and_compare(plan, model, x, hard)
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert sum(c.out_channels for c in convs) < 0.6 * sum(r.weight_shape[0] for r in plan.layers[:-1])


class NextBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, NCHW -> NHWC transpose, LayerNorm, Linear MLP, transpose back, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 2, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        x = x + self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def test_converted_transpose_layernorm_block(tmp_path: Path) -> None:
    torch.manual_seed(7)
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path / "next.onnx"
    torch.onnx.export(NextBlock().eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    model = load_model(path, [1, 3, 16, 16], verify=False).module
    plan = build_plan(model, x, "channel", CPU)
    # the transposes do not block: the residual stream (through LayerNorm) and the MLP hidden are both units
    assert len(plan.units) == 2 and any("LayerNorm" in n for n in plan.notes), plan.notes
    hidden = next(u for u in plan.units if isinstance(u, ChannelUnit) and u.channels == 64)
    hard = [torch.ones(u.num_groups) if u is not hidden else (torch.arange(64) < 32).float() for u in plan.units]
    pruned = _prune_and_compare(plan, model, x, hard)  # MLP hidden only: no LayerNorm, so masking == removal
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    model2 = load_model(path, [1, 3, 16, 16], verify=False).module
    plan2 = build_plan(model2, x, "channel", CPU)
    pruned2 = plan2.finalize(plan2.select(plan2.group_norms(), 0.5, "uniform", 0.05))
    assert pruned2(torch.randn(2, 3, 16, 16)).shape == (2, 10)  # residual stream + LayerNorm removed too
    assert _params(pruned2) < _params(pruned)


def test_reshape_targets_follow_channel_counts() -> None:
    assert reshape_target_after([1, 512], (1, 512, 1, 1), (1, 256, 1, 1)) == [1, 256]  # static flatten
    assert reshape_target_after([0, 2048], (1, 512, 2, 2), (1, 256, 2, 2)) == [0, 1024]  # 0 = copy the batch dim
    assert reshape_target_after([1, 512, 1, 1], (1, 512), (1, 256)) == [1, 256, 1, 1]  # unsqueeze keeps C at dim 1
    assert reshape_target_after([1, -1], (1, 512, 1, 1), (1, 256, 1, 1)) == [1, -1]  # already adaptive


@pytest.mark.slow
def test_dynamo_exported_resnet18_static_flatten_target_follows_pruning(tmp_path: Path) -> None:
    """The dynamo exporter flattens with a constant Reshape target [1, 512]; it must become [1, kept]."""
    torch.manual_seed(6)
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "r18.onnx"
    torch.onnx.export(torchvision.models.resnet18(weights=None).eval(), (x,), str(path), dynamo=True,
                      input_names=["input"], output_names=["logits"])
    model = load_model(path, [1, 3, 64, 64], verify=False).module
    plan = build_plan(model, x, "channel", CPU)
    hard = plan.select(plan.group_norms(), 0.5, "uniform", 0.05)
    pruned = _prune_and_compare(plan, model, x, hard)
    assert any("reshape target [1, 512] -> [1, 256]" in n for n in plan.notes), plan.notes
    assert pruned(x).shape == (1, 1000)


@pytest.mark.slow
def test_converted_shufflenet_keeps_shuffled_groups_and_prunes_the_rest() -> None:
    torch.manual_seed(5)
    x = torch.randn(1, 3, 64, 64)
    model = _converted("shufflenet_v2_x0_5", x)
    plan = build_plan(model, x, "channel", AcceleratorProfile(name="t", channel_multiple=8))
    shuffled = [r for r in plan.layers if "channel shuffle" in r.reason]
    assert shuffled and all(not r.prunable for r in shuffled)
    assert len(plan.units) > 10  # the inner branch channels stay prunable
    hard = plan.select(plan.group_norms(), 0.5, "uniform", 0.05)
    pruned = _prune_and_compare(plan, model, x, hard)
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
