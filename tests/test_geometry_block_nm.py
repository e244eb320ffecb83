"""Block (R x C tiles) and N:M geometry: exact patterns, budgets, masks, overrides."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruning_core.accelerators import AcceleratorProfile
from pruning_core.errors import InvalidRequest
from pruning_core.geometry import BlockUnit, NMUnit, build_plan


class OddNet(nn.Module):
    """Shapes chosen so no dimension divides the 4x4 tile: every layer has ragged edge tiles."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)  # (6, 27): 2 x 7 tiles, last row/col ragged
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise: kept
        self.conv2 = nn.Conv2d(6, 8, 1)  # (8, 6)
        self.fc1 = nn.Linear(8, 13)  # (13, 8)
        self.fc2 = nn.Linear(13, 5)  # model output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.dw(torch.relu(self.conv(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class NMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 3 input channels: not a multiple of M=4
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


BLOCK44 = AcceleratorProfile(name="t44", block_shape=(4, 4))
NM24 = AcceleratorProfile(name="t24", nm=(2, 4), default_granularity="nm")
X = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))


def _tiles(w2: torch.Tensor, r: int, c: int) -> list[torch.Tensor]:
    """Tiles enumerated independently of the implementation: plain slicing, row-major."""
    return [w2[i : i + r, j : j + c] for i in range(0, w2.shape[0], r) for j in range(0, w2.shape[1], c)]


@pytest.mark.parametrize("block", [(4, 4), (1, 4), (4, 1), (3, 5)])
def test_block_tiles_all_or_nothing_on_ragged_shapes(block: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = OddNet().eval()
    prof = AcceleratorProfile(name="t", block_shape=block)
    plan = build_plan(model, X, "block", prof)
    dense = {u.name: u.module.weight.detach().clone().reshape(u.module.weight.shape[0], -1) for u in plan.units}
    assert {u.name for u in plan.units} == {"conv", "conv2", "fc1"}
    for u in plan.units:
        tiles = _tiles(dense[u.name], *block)
        assert u.num_groups == len(tiles)
        assert torch.equal(u.group_sizes(), torch.tensor([float(t.numel()) for t in tiles]))
        assert torch.allclose(u.group_norms(), torch.stack([t.norm() for t in tiles]), atol=1e-6)
    scores = [torch.rand(u.num_groups) for u in plan.units]
    hard = plan.select(scores, 0.5, "uniform", 0.05)
    plan.finalize(hard)
    for u, m in zip(plan.units, hard, strict=True):
        w2 = u.module.weight.detach().reshape(u.module.weight.shape[0], -1)
        for k, (t_after, t_before) in enumerate(zip(_tiles(w2, *block), _tiles(dense[u.name], *block), strict=True)):
            if m[k] == 1:
                assert torch.equal(t_after, t_before), f"{u.name} tile {k} kept but changed"
            else:
                assert torch.count_nonzero(t_after) == 0, f"{u.name} tile {k} pruned but not all zero"
        # uniform: each layer within one group of the target
        assert abs(int(m.sum()) - 0.5 * u.num_groups) <= 1
    assert not any(hasattr(mod, "parametrizations") for mod in model.modules())
    assert model(X).shape == (2, 5)


def test_block_records_explain_every_layer() -> None:
    plan = build_plan(OddNet(), X, "block", BLOCK44)
    reasons = {r.name: (r.prunable, r.reason) for r in plan.layers}
    assert set(reasons) == {"conv", "dw", "conv2", "fc1", "fc2"}
    assert reasons["dw"][0] is False and "depthwise" in reasons["dw"][1]
    assert reasons["fc2"][0] is False and "output" in reasons["fc2"][1]
    hard = plan.select(plan.group_norms(), 0.75, "uniform", 0.05)
    plan.finalize(hard)
    rec = {r.name: r for r in plan.layers}
    for u, m in zip(plan.units, hard, strict=True):
        w = u.module.weight
        assert rec[u.name].groups == u.num_groups and rec[u.name].kept == int(m.sum())
        assert rec[u.name].sparsity == pytest.approx(float((w == 0).sum()) / w.numel())


def test_nm_exactly_n_per_run_along_input_dim() -> None:
    torch.manual_seed(1)
    model = NMNet().eval()
    plan = build_plan(model, X, "nm", NM24)
    rec = {r.name: r for r in plan.layers}
    assert not rec["conv"].prunable and rec["conv"].reason == "input channels per group 3 not a multiple of M=4"
    assert [u.name for u in plan.units] == ["conv2", "fc1"]  # fc2 produces the output
    dense = {u.name: u.module.weight.detach().clone() for u in plan.units}
    hard = plan.select(plan.group_norms(), 0.9, "global", 0.05)  # sparsity is fixed by 2:4, not by 0.9
    plan.finalize(hard)
    for u in plan.units:
        assert isinstance(u, NMUnit) and u.nm_m == 4
        w, w0 = u.module.weight.detach(), dense[u.name]
        # runs of M consecutive input channels at each (out, kh, kw) position, built independently here
        runs = w.permute(0, 2, 3, 1).reshape(-1, 4) if w.dim() == 4 else w.reshape(-1, 4)
        runs0 = w0.permute(0, 2, 3, 1).reshape(-1, 4) if w0.dim() == 4 else w0.reshape(-1, 4)
        assert torch.equal((runs != 0).sum(1), torch.full((runs.shape[0],), 2))
        # the survivors are the two largest magnitudes of each run, unchanged
        top2 = runs0.abs().topk(2, dim=1).indices
        assert torch.equal(runs.gather(1, top2), runs0.gather(1, top2))
        assert rec[u.name].sparsity == 0.5
    assert model(X).shape == (2, 4)


def test_nm_linear_with_indivisible_in_features_is_kept() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = build_plan(model, torch.randn(2, 6), "nm", NM24)
    rec = {r.name: r for r in plan.layers}
    assert rec["0"].reason == "in_features 6 not a multiple of M=4" and not rec["0"].prunable
    assert [u.name for u in plan.units] == ["2"]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_block_budget_met(allocation: str, sparsity: float) -> None:
    torch.manual_seed(2)
    plan = build_plan(OddNet(), X, "block", AcceleratorProfile(name="t", block_shape=(1, 4)))
    norms = [n / s.sqrt() for n, s in zip(plan.group_norms(), [u.group_sizes() for u in plan.units], strict=True)]
    hard = plan.select(norms, sparsity, allocation, 0.01)
    total = sum(u.num_groups for u in plan.units)
    if allocation == "global":
        assert abs(plan.group_sparsity(hard) - sparsity) <= 1 / total + 1e-9
    else:
        for u, m in zip(plan.units, hard, strict=True):
            assert abs(int(m.sum()) - (1 - sparsity) * u.num_groups) <= 1


def test_min_keep_honoured_at_097_even_when_a_layer_has_tiny_weights() -> None:
    torch.manual_seed(3)
    model = OddNet()
    with torch.no_grad():
        model.conv2.weight.mul_(1e-4)  # a global ranking alone would delete this layer
    plan = build_plan(model, X, "block", AcceleratorProfile(name="t", block_shape=(1, 4)))
    hard = plan.select(plan.group_norms(), 0.97, "global", 0.05)
    for u, m in zip(plan.units, hard, strict=True):
        assert int(m.sum()) >= math.ceil(0.05 * u.num_groups) >= 1, u.name
    assert int(hard[[u.name for u in plan.units].index("conv2")].sum()) == math.ceil(0.05 * 12)
    hard = plan.select(plan.group_norms(), 0.97, "global", 0.0)
    assert all(int(m.sum()) >= 1 for m in hard)  # never delete a layer, even with min_keep 0


def test_soft_masks_receive_gradients_and_match_manual_masking() -> None:
    torch.manual_seed(4)
    model = OddNet().eval()
    y_dense = model(X)
    plan = build_plan(model, X, "block", BLOCK44)
    plan.attach()
    assert torch.equal(model(X), y_dense)  # all-ones masks leave the model unchanged
    soft = [torch.rand(u.num_groups, requires_grad=True) for u in plan.units]
    plan.set_masks(soft)
    loss = model(X).square().sum()
    loss.backward()
    for s in soft:
        assert s.grad is not None and s.grad.abs().sum() > 0
    # same function written by hand: weight * (mask tile repeated), sliced to the ragged shape
    ref = OddNet().eval()
    ref.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                         for k, v in model.state_dict().items()})
    for u, s in zip(plan.units, soft, strict=True):
        assert isinstance(u, BlockUnit)
        layer = getattr(ref, u.name)
        out, cols = layer.weight.shape[0], layer.weight[0].numel()
        full = s.detach().reshape(u.n_r, u.n_c).repeat_interleave(4, 0).repeat_interleave(4, 1)[:out, :cols]
        with torch.no_grad():
            layer.weight.mul_(full.reshape(layer.weight.shape))
    assert torch.allclose(model(X), ref(X), atol=1e-6)  # float32 round-off only


def test_overrides_respected_and_unknown_names_refused() -> None:
    plan = build_plan(OddNet(), X, "block", BLOCK44, overrides={"conv": "keep", "fc2": "prune"})
    names = [u.name for u in plan.units]
    assert "conv" not in names and "fc2" in names
    rec = {r.name: r for r in plan.layers}
    assert rec["conv"].reason == "override: keep" and rec["fc2"].reason == "override: prune"
    with pytest.raises(InvalidRequest, match="nope"):
        build_plan(OddNet(), X, "block", BLOCK44, overrides={"nope": "keep"})
    with pytest.raises(InvalidRequest, match="block_shape"):
        build_plan(OddNet(), X, "block", NM24)


def test_jobs_that_can_prune_nothing_are_refused() -> None:
    from pruning_core.accelerators import resolve_profile
    from pruning_core.errors import InvalidRequest
    from pruning_core.geometry import build_plan, require_prunable

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(InvalidRequest, match="block 512x512 is as large as every prunable weight"):
        require_prunable(build_plan(model, x, "block", resolve_profile({"block_shape": [512, 512]}), {}))
    empty = build_plan(model, x, "block", resolve_profile("npu-4x4"), {"0": "keep", "3": "keep"})
    assert not empty.units  # building an empty plan is fine (3D's width axis does it) ...
    with pytest.raises(InvalidRequest, match="no layer can be pruned"):  # ... a job on it is refused
        require_prunable(empty)
