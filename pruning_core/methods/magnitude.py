"""Magnitude pruning: the baseline SMART is compared against, made as strong as we can.

Scores are group L2 norms divided by sqrt(group size) (the RMS of the group, fair to ragged edge tiles and
to channel groups of different fan-in). One-shot prunes to the target before fine-tuning; gradual follows the
cubic schedule of Zhu & Gupta 2017 (arXiv 1710.01878) over the first 2/3 of the steps, then fine-tunes
under the fixed mask. Allocation:
* `uniform`: the same fraction of every unit (robust; matches SMART on channels per the reference notes);
* `global`: one ranking across units. How to make scores comparable was measured on the digits CNN
  (docs/benchmarks/magnitude.md): for block (and N:M, where it does not matter) raw RMS is best — small-fan-in
  layers such as the first conv have large RMS and keep more tiles (block 4x4 at 0.9: 0.966 test accuracy vs
  0.673 for layer-relative scores and 0.709 for uniform); for channels behind BatchNorm raw filter
  magnitudes are scale-free and a global raw ranking starves a layer (channel 0.75: 0.654 vs 0.804), so each
  unit's scores are divided by their mean (relative magnitude). `score_norm="auto"` (default) picks "rms"
  for block / N:M and "layer" for channel; either can be forced.
Every unit keeps at least `min_keep` of its groups: without it global channel magnitude deletes whole
layers and the model collapses (see shared/papers/smart-pruner.md). Shaped like torch.ao.pruning:
`prepare()`, `step()`, `squash_mask()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pruning_core.data import TrainData
from pruning_core.errors import InvalidRequest
from pruning_core.geometry import PruningPlan, PruningUnit
from pruning_core.progress import StageProgress
from pruning_core.schedules import GradualSchedule
from pruning_core.spec import PruneSpec
from pruning_core.train import TrainConfig, train_steps

SCORE_NORMS = ("auto", "layer", "rms")


@dataclass
class MagnitudeConfig:
    schedule: str = "gradual"  # "oneshot" | "gradual" (cubic, Zhu & Gupta 2017)
    allocation: str = "uniform"  # "uniform" (same fraction per unit) | "global" (one ranking)
    min_keep: float = 0.05  # every unit keeps at least this fraction of its groups (and at least one)
    prune_fraction: float = 2 / 3  # gradual: prune during this share of the steps, then fixed-mask fine-tuning
    updates: int = 10  # gradual: mask updates during the pruning phase
    score_norm: str = "auto"  # global: "rms" = raw RMS, "layer" = RMS / unit's mean RMS; auto: rms, layer for channel

    def __post_init__(self) -> None:
        if self.schedule not in ("oneshot", "gradual"):
            raise InvalidRequest(f"schedule must be 'oneshot' or 'gradual', got {self.schedule!r}")
        if self.allocation not in ("global", "uniform"):
            raise InvalidRequest(f"allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if self.score_norm not in SCORE_NORMS:
            raise InvalidRequest(f"score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")


def resolve_score_norm(score_norm: str, granularity: str) -> str:
    if score_norm != "auto":
        return score_norm
    return "layer" if granularity == "channel" else "rms"


def magnitude_scores(units: Sequence[PruningUnit], score_norm: str = "rms",
                     masks: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """RMS group magnitudes, optionally relative to each unit's mean; groups already masked out score 0."""
    scores = []
    for i, u in enumerate(units):
        s = u.group_norms().float() / u.group_sizes().to(u.group_norms().device).clamp_min(1).sqrt()
        if score_norm == "layer" and u.nm_m is None:
            s = s / s.mean().clamp_min(1e-12)
        if masks is not None and masks[i] is not None and u.nm_m is None:
            s = s * masks[i].to(s.device)  # type: ignore[union-attr]  # monotone: pruned groups stay pruned
        scores.append(s)
    return scores


class MagnitudePruner:
    """Hard magnitude masks on a plan: `prepare()`, `step(i, total)` after each optimiser step, `squash_mask()`."""

    def __init__(self, plan: PruningPlan, sparsity: float, schedule: str = "gradual",
                 allocation: str = "uniform", min_keep: float = 0.05, config: MagnitudeConfig | None = None) -> None:
        if not 0.0 < sparsity < 1.0:
            raise InvalidRequest(f"sparsity must be in (0, 1), got {sparsity}")
        base = config or MagnitudeConfig()
        self.cfg = MagnitudeConfig(schedule, allocation, min_keep, base.prune_fraction, base.updates,
                                   base.score_norm)
        self.plan, self.sparsity = plan, sparsity
        self.hard: list[Tensor] | None = None
        self.current_sparsity = 0.0
        self.updates_done = 0

    def _apply(self, sparsity: float) -> None:
        norm = resolve_score_norm(self.cfg.score_norm, self.plan.granularity)
        scores = magnitude_scores(self.plan.units, norm, self.hard)
        self.hard = self.plan.select(scores, sparsity, self.cfg.allocation, self.cfg.min_keep)
        self.plan.set_masks(self.hard)
        self.current_sparsity = sparsity
        self.updates_done += 1

    def prepare(self, total_steps: int = 0) -> None:
        """Attach masks; one-shot (or a run without steps) prunes to the target right away."""
        self.plan.attach()
        if self.cfg.schedule == "oneshot" or total_steps <= 0:
            self._apply(self.sparsity)

    def step(self, step_index: int, total_steps: int) -> bool:
        """After optimiser step `step_index`: gradual pruning raises sparsity on the cubic schedule."""
        if self.cfg.schedule == "oneshot":
            return False
        sched = GradualSchedule(self.sparsity, total_steps, self.cfg.prune_fraction, self.cfg.updates)
        if not sched.is_update(step_index):
            return False
        self._apply(sched.sparsity_at(step_index))
        return True

    def squash_mask(self) -> nn.Module:
        """Bake the final masks (zeros, or physically removed channels) and return the model."""
        if self.hard is None or self.current_sparsity < self.sparsity:
            self._apply(self.sparsity)
        assert self.hard is not None
        return self.plan.finalize(self.hard)


def run_magnitude(model: nn.Module, teacher: nn.Module | None, plan: PruningPlan, spec: PruneSpec,
                  data: TrainData, stage_progress: StageProgress | None = None,
                  config: MagnitudeConfig | None = None) -> nn.Module:
    """Magnitude-prune `model` (the plan's model) and fine-tune it for `spec.steps` steps with distillation."""
    assert plan.model is model, "the plan must be built on the model being pruned"
    assert spec.target_sparsity is not None, "magnitude pruning needs target_sparsity"
    pruner = MagnitudePruner(plan, spec.target_sparsity, spec.schedule, spec.allocation, spec.min_keep, config)
    total = spec.steps
    pruner.prepare(total)
    tcfg = TrainConfig(lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    torch.manual_seed(spec.seed)

    def after_step(i: int) -> None:
        pruner.step(i, total)

    train_steps(model, teacher, data, total, tcfg, progress=stage_progress, after_step=after_step)
    return pruner.squash_mask()
