"""Width axis: one kept ratio through the channel plan; the channel scorer is pluggable (magnitude, SMART)."""

from __future__ import annotations

import torch
from test_three_d_models import X, one_thread, traced

from pruning_core.accelerators import resolve_profile
from pruning_core.data import TrainData
from pruning_core.geometry import build_plan
from pruning_core.methods.three_d.width import kept_counts, magnitude_scores, prune_width, smart_scorer
from pruning_core.train import TrainConfig

__all__ = ["one_thread"]  # the autouse fixture, re-exported so it applies here

PROFILE = resolve_profile({"channel_multiple": 4})


def conv_widths(m: torch.nn.Module) -> list[int]:
    return [mod.out_channels for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]


def test_uniform_keep_is_rounded_to_the_channel_multiple_and_predicted_by_kept_counts() -> None:
    gm = traced()
    res = prune_width(gm, X, 0.6, PROFILE)
    widths = conv_widths(res.module)
    # 16 -> round(9.6 / 4) * 4 = 8 and 32 -> round(19.2 / 4) * 4 = 20, the channel-multiple rounding of the plan.
    assert set(widths) == {8, 20}, widths
    assert all(w % 4 == 0 for w in widths)
    assert kept_counts(gm, X, [0.6], PROFILE)[0.6] == (res.kept, res.total)
    assert res.module(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_smart_scorer_learns_scores_and_keeps_the_same_counts() -> None:
    gm = traced()
    data = TrainData(torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,)), "labelled", "random")
    scorer = smart_scorer(gm, data, steps=6, train=TrainConfig(batch_size=16))
    plan = build_plan(traced(), X, "channel", PROFILE)
    learned = scorer(plan, 0.6)
    init = magnitude_scores(build_plan(traced(), X, "channel", PROFILE))
    assert [s.numel() for s in learned] == [s.numel() for s in init]
    assert not all(torch.allclose(a, b) for a, b in zip(learned, init, strict=True))  # Adam moved the scores
    res = prune_width(gm, X, 0.6, PROFILE, scorer=scorer)
    assert sorted(conv_widths(res.module)) == sorted(conv_widths(prune_width(gm, X, 0.6, PROFILE).module))
    assert res.module(torch.randn(2, 1, 16, 16)).shape == (2, 10)
