"""Width axis: one kept-channel ratio applied to every prunable channel group, through the geometry plan.

The plan (`pruning_core.geometry`, channel granularity) couples residual adds and depthwise convs and rounds
kept counts to the accelerator's channel multiple; "uniform" allocation gives every group the same kept
fraction w, as the width dimension of Wang et al., ICML 2021 (arXiv 2010.04879) assumes. Which channels go is
decided by a pluggable scorer: group magnitude by default, or SMART's learned channel scores (`smart_scorer`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from pruning_core.accelerators import AcceleratorProfile
from pruning_core.data import TrainData
from pruning_core.geometry import PruningPlan, build_plan
from pruning_core.methods.smart.config import SmartConfig
from pruning_core.methods.smart.pruner import SmartPruner
from pruning_core.train import TrainConfig, train_steps

# (plan of the model to prune, kept fraction asked) -> one score tensor per unit, [num_groups]; higher = keep.
ChannelScorer = Callable[[PruningPlan, float], Sequence[Tensor]]


def magnitude_scores(plan: PruningPlan, keep: float = 1.0) -> list[Tensor]:
    """L2 norm over all coupled out-channel parameters of each channel (the Torch-Pruning default)."""
    return [u.group_norms() for u in plan.units]


def smart_scorer(teacher: nn.Module, data: TrainData, steps: int, train: TrainConfig,
                 config: SmartConfig | None = None) -> ChannelScorer:
    """Channel scores learned by SMART's soft top-k (Ding et al., arXiv 2403.19969) at the asked keep.

    Runs SMART's soft phase (joint training of weights and scores while tau anneals, `steps` steps) on the
    plan's model and returns the learned scores; `prune_width` then keeps the top channels through
    `plan.select`, so rounding to the channel multiple is the same as for magnitude. The weights the soft phase
    trained are kept (they were trained for this mask).
    """
    cfg = config or SmartConfig()

    def score(plan: PruningPlan, keep: float) -> list[Tensor]:
        pruner = SmartPruner(plan, 1.0 - keep, steps, cfg)
        params = pruner.prepare(next(plan.model.parameters()).device)
        soft = dataclasses.replace(train, min_lr_ratio=1.0)  # constant weight lr, as in SMART's soft phase
        train_steps(plan.model, teacher, data, steps, soft,
                    extra_param_groups=[{"params": params, "lr": cfg.score_lr, "betas": cfg.score_betas,
                                         "weight_decay": 0.0}],
                    before_step=pruner.soft_step, after_step=pruner.observe)
        return [s.detach().clone() for s in pruner.unit_scores()]

    return score


@dataclass
class WidthResult:
    module: nn.Module
    kept: int  # channels kept over all prunable groups
    total: int  # channels in all prunable groups before this step


def kept_counts(model: nn.Module, example_input: Tensor, keeps: Sequence[float], profile: AcceleratorProfile,
                min_keep: float = 0.05) -> dict[float, tuple[int, int]]:
    """keep -> (kept, total) channels `prune_width(keep)` would leave, without touching the model (for the solver).

    One plan serves every keep: the counts depend only on the group sizes and the rounding rules.
    """
    plan = build_plan(copy.deepcopy(model), example_input, "channel", profile)
    total = sum(u.num_groups for u in plan.units)
    scores = magnitude_scores(plan)
    out: dict[float, tuple[int, int]] = {}
    for keep in keeps:
        if not plan.units or keep >= 1.0:
            out[keep] = (total, total)
            continue
        masks = plan.select(scores, 1.0 - keep, "uniform", min_keep)
        out[keep] = (int(sum(float(m.sum()) for m in masks)), total)
    return out


def prune_width(model: nn.Module, example_input: Tensor, keep: float, profile: AcceleratorProfile,
                scorer: ChannelScorer = magnitude_scores, min_keep: float = 0.05) -> WidthResult:
    """A pruned deep copy of `model` keeping ~`keep` of every prunable channel group (rounded by the plan)."""
    assert 0.0 < keep <= 1.0, f"kept channel fraction must be in (0, 1], got {keep}"
    out = copy.deepcopy(model)
    plan = build_plan(out, example_input, "channel", profile)
    total = sum(u.num_groups for u in plan.units)
    if not plan.units or keep >= 1.0:
        return WidthResult(out, total, total)
    masks = plan.select(list(scorer(plan, keep)), 1.0 - keep, "uniform", min_keep)
    kept = int(sum(float(m.sum()) for m in masks))
    pruned = plan.finalize(masks)
    return WidthResult(pruned, kept, total)
