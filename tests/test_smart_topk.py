"""The differentiable top-k of SMART: exact budget at every temperature, correct implicit-gradient backward."""

from __future__ import annotations

import pytest
import torch

from pruning_core.methods.smart.topk import soft_topk

TAUS = [1.0, 0.1, 1e-2, 1e-3]


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])  # wide score ranges: m / tau spans up to ~1e7
def test_global_mask_sums_to_k(tau: float, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2000, generator=g, dtype=torch.float64) * scale
    k = 613
    f = soft_topk(scores, k, tau)
    # float64 throughout; the solver is exact to ~1e-9, so 1e-4 (the requirement) has a wide margin
    assert abs(float(f.sum()) - k) < 1e-4
    assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
    # the mask is monotone in the score: a higher score never gets a smaller mask value
    order = torch.argsort(scores)
    assert bool((f[order].diff() >= -1e-12).all())


@pytest.mark.parametrize("tau", TAUS)
def test_float32_scores_keep_the_budget(tau: float) -> None:
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 10
    f = soft_topk(scores, 250, tau)
    assert f.dtype == torch.float32
    # each entry is rounded to float32 once (|err| <= 2^-25); 1000 entries -> worst case 3e-5 < 1e-4
    assert abs(float(f.double().sum()) - 250) < 1e-4


@pytest.mark.parametrize("tau", TAUS)
def test_nm_rows_each_sum_to_n(tau: float) -> None:
    scores = torch.randn(500, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    f = soft_topk(scores, 2, tau)
    assert float((f.sum(dim=1) - 2).abs().max()) < 1e-4


@pytest.mark.parametrize("tau", TAUS)
def test_float32_nm_rows_sum_to_n(tau: float) -> None:
    scores = torch.randn(2000, 4, generator=torch.Generator().manual_seed(5)) * 30
    f = soft_topk(scores, 2, tau)
    # solved in float64, rounded once to float32: 4 entries x 2^-25 per row, far below the 1e-4 requirement
    assert float((f.double().sum(dim=1) - 2).abs().max()) < 1e-6


def test_low_temperature_is_the_hard_top_k() -> None:
    scores = torch.randperm(100, generator=torch.Generator().manual_seed(3)).double()  # distinct, gaps of 1
    f = soft_topk(scores, 10, 1e-3)
    hard = torch.zeros(100, dtype=torch.float64)
    hard[torch.topk(scores, 10).indices] = 1.0
    # gap 1 / tau 1e-3 = 1000 logits between kept and dropped: sigmoid differs from 0/1 by < e^-400
    assert torch.allclose(f, hard, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_backward_matches_finite_differences(tau: float) -> None:
    g = torch.Generator().manual_seed(4)
    flat = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 11, tau), (flat,), eps=1e-6, atol=1e-6)
    runs = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 2, tau), (runs,), eps=1e-6, atol=1e-6)


def test_gradient_of_the_sum_is_zero() -> None:
    """The budget is fixed, so no score change can change sum(f): d(sum f)/dm = 0 exactly."""
    scores = torch.randn(300, dtype=torch.float64, requires_grad=True)
    soft_topk(scores, 100, 0.5).sum().backward()
    assert scores.grad is not None
    assert float(scores.grad.abs().max()) < 1e-12


def test_gradient_raises_a_score_when_its_group_helps() -> None:
    """A loss rewarding group 0's mask must push score 0 up and the others (on average) down."""
    scores = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    (-soft_topk(scores, 3, 1.0)[0]).backward()
    assert scores.grad is not None
    assert float(scores.grad[0]) < 0 and float(scores.grad[1:].sum()) > 0
