"""The SMART pruner: separate learnable scores, differentiable top-k, dynamic temperature.

Reference: Ding, Ye, Zhong, Li, Shao, "Separate, Dynamic and Differentiable (SMART) Pruner for Block/Output
Channel Pruning on Computer Vision Tasks", arXiv 2403.19969 (v2 adds the three-stage training flow).

Flow (`run_smart`): dense start -> soft phase: joint training of the weights (task + distillation loss via
`pruning_core.train.train_steps`) and of one score per group (Adam), with the mask f = soft_topk(scores / tau)
applied through the plan's parametrizations while tau anneals -> hard top-k of the final scores through
`plan.select` (so N:M, min_keep and channel-multiple rounding are the geometry's, shared with magnitude) ->
fine-tuning under the fixed hard mask -> `plan.finalize` (zeros baked, or channels physically removed).

The top-k is global across units for block (per-layer sparsity is learned), per M-run for N:M, and per
dependency group for channels by default (`SmartConfig.channel_allocation`: with BatchNorm networks the soft
relaxation misprices per-layer channel budgets; "global" keeps the paper's single top-k).
Masks stay parametrizations (effective weight = w * mask) during fine-tuning, so Adam momentum cannot revive
pruned weights; `finalize` bakes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from pruning_core.data import TrainData
from pruning_core.geometry import PruningPlan, PruningUnit
from pruning_core.geometry.select import min_kept, uniform_counts
from pruning_core.methods.smart.config import SmartConfig
from pruning_core.methods.smart.temperature import Temperature
from pruning_core.methods.smart.topk import (
    Floors,
    soft_topk,
    soft_topk_floors,
    soft_topk_floors_bound,
    soft_topk_per_unit,
)
from pruning_core.progress import Progress, StageProgress
from pruning_core.spec import PruneSpec
from pruning_core.train import TrainConfig, make_optimizer, predict, train_steps


def _standardise(x: Tensor) -> Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if x.numel() > 1 else x - x.mean()


def init_scores(units: list[PruningUnit], mode: str) -> Tensor:
    """Flat scores from group norms / sqrt(group size) (fair to ragged edge tiles), standardised.

    "global" standardises over all units at once, which keeps the global magnitude ranking (step 0 of SMART
    equals global magnitude pruning) and gives tau a fixed scale; "layer" first divides each unit by its mean
    (relative magnitude: layers before a BatchNorm are scale-invariant, so raw norms are not comparable across
    them), then standardises globally; "unit" standardises each unit on its own.
    """
    raw = [u.group_norms().float() / u.group_sizes().float().clamp_min(1).sqrt() for u in units]
    if mode == "global":
        return _standardise(torch.cat(raw))
    if mode == "layer":  # relative magnitude (RMS / unit mean RMS), then one global standardisation
        return _standardise(torch.cat([r / r.mean().clamp_min(1e-12) for r in raw]))
    return torch.cat([_standardise(r) for r in raw])


class SmartPruner:
    """torch.ao.pruning-shaped: `prepare()`, `soft_step(step)` / `observe(step)`, `harden()`, `squash_mask()`."""

    def __init__(self, plan: PruningPlan, sparsity: float, soft_steps: int, config: SmartConfig | None = None,
                 min_keep: float = 0.01) -> None:
        self.plan, self.sparsity, self.min_keep = plan, sparsity, min_keep
        self.cfg = config or SmartConfig()
        self.temperature = Temperature(self.cfg, max(soft_steps, 1))
        self.nm_idx = [i for i, u in enumerate(plan.units) if u.nm_m is not None]
        self.dense_idx = [i for i, u in enumerate(plan.units) if u.nm_m is None]
        nm_units = [plan.units[i] for i in self.nm_idx]
        assert len({(u.nm_n, u.nm_m) for u in nm_units}) <= 1, "all N:M units of a plan share one N:M pattern"
        self.nm: tuple[int, int] | None = None
        if nm_units:
            n0, m0 = nm_units[0].nm_n, nm_units[0].nm_m
            assert n0 is not None and m0 is not None, f"{nm_units[0].name}: N:M unit without N"
            self.nm = (n0, m0)
        n_dense = sum(plan.units[i].num_groups for i in self.dense_idx)
        # channel plans, "uniform": one budget per unit, the counts the hard selection keeps (config docstring)
        self.allocation = "uniform" if plan.granularity == "channel" and self.cfg.channel_allocation == "uniform" \
            else "global"
        self.unit_budgets: list[int] | None = None
        if self.allocation == "uniform" and self.dense_idx:
            self.unit_budgets = uniform_counts([plan.units[i] for i in self.dense_idx], sparsity, min_keep)
            self.k = sum(self.unit_budgets) if sum(self.unit_budgets) < n_dense else 0  # all kept: nothing to learn
        else:
            # global budget for block / channel units, k = round((1 - s) * N), kept strictly inside (0, N)
            self.k = min(max(round((1.0 - sparsity) * n_dense), 1), n_dense - 1) if n_dense > 1 else 0
        self.scores: list[nn.Parameter] = []  # [dense scores] and/or [N:M scores], flat
        self.floors: Floors | None = None  # per-unit min_keep floors of the soft top-k (config.soft_floors); with
        #   per-unit budgets (channel_allocation "uniform") the same bookkeeping holds each unit's exact budget
        self.floors_bound = False  # a floor bound at the last floored step (skip the plain solve next time)
        self.hard: list[Tensor] | None = None
        self.last: dict[str, float] = {}

    # -- setup ---------------------------------------------------------------------------------------
    def prepare(self, device: torch.device | None = None) -> list[nn.Parameter]:
        """Attach the plan's masks and create the score parameters (returned for the optimizer)."""
        self.plan.attach()
        for idx in (self.dense_idx, self.nm_idx):
            if idx:
                mode = self.cfg.score_init
                if mode == "auto":
                    mode = "layer" if self.plan.granularity == "channel" else "global"
                s = init_scores([self.plan.units[i] for i in idx], mode)
                self.scores.append(nn.Parameter(s.to(device) if device is not None else s))
        if self.unit_budgets is not None:  # every unit its own top-k (Floors holds the per-unit bookkeeping)
            self.floors = Floors([self.plan.units[i].num_groups for i in self.dense_idx], self.unit_budgets,
                                 self.scores[0].device)
        elif self.dense_idx and self.cfg.soft_floors != "off":
            units = [self.plan.units[i] for i in self.dense_idx]
            self.floors = Floors([u.num_groups for u in units], [min_kept(u, self.min_keep) for u in units],
                                 self.scores[0].device, exact_grad=self.cfg.soft_floors == "exact")
        return self.scores

    def unit_scores(self) -> list[Tensor]:
        """Current scores split per unit, in plan order (views of the flat parameters)."""
        out: list[Tensor | None] = [None] * len(self.plan.units)
        j = 0
        for idx in (self.dense_idx, self.nm_idx):
            if idx:
                parts = torch.split(self.scores[j], [self.plan.units[i].num_groups for i in idx])
                for i, p in zip(idx, parts, strict=True):
                    out[i] = p
                j += 1
        return [o for o in out if o is not None]

    # -- soft phase ----------------------------------------------------------------------------------
    def soft_masks(self, tau: float, floors: bool = True) -> list[Tensor]:
        """Soft masks per unit: global top-k over block groups (and channels with `channel_allocation="global"`),
        a top-k per unit for channels by default, top-N of every M-run for N:M."""
        flat: list[Tensor] = []
        j = 0
        if self.dense_idx:
            if self.k <= 0:
                flat.append(torch.ones_like(self.scores[j]))
            elif self.unit_budgets is not None:
                assert self.floors is not None, "call prepare() first"
                flat.append(soft_topk_per_unit(self.scores[j], tau, self.floors))
            elif self.floors is not None and floors and self.floors_bound:
                # they bound at the last step and scores move little per step: solve with floors directly (its
                # solution is the plain one whenever no floor binds) and see whether they still bind
                mask, bound = soft_topk_floors_bound(self.scores[j], self.k, tau, self.floors)
                self.floors_bound = bool(bound)
                flat.append(mask)
            else:
                mask = soft_topk(self.scores[j], self.k, tau)
                # floors only where they bind: otherwise the floored mask is this one (same backward too)
                if self.floors is not None and floors and self.floors.violated(mask.detach()):
                    mask = soft_topk_floors(self.scores[j], self.k, tau, self.floors)
                    self.floors_bound = True
                flat.append(mask)
            j += 1
        if self.nm_idx:
            assert self.nm is not None, "N:M units without a pattern"
            n, m = self.nm
            flat.append(soft_topk(self.scores[j].reshape(-1, m), n, tau).reshape(-1))
        out: list[Tensor | None] = [None] * len(self.plan.units)
        j = 0
        for idx in (self.dense_idx, self.nm_idx):
            if idx:
                for i, p in zip(idx, torch.split(flat[j], [self.plan.units[i].num_groups for i in idx]), strict=True):
                    out[i] = p
                j += 1
        return [o for o in out if o is not None]

    def soft_step(self, step: int) -> None:
        """before_step hook: recompute the soft masks at this step's temperature (graph to the scores)."""
        tau = self.temperature.tau(step)
        masks = self.soft_masks(tau, step >= self.cfg.floors_after * self.temperature.soft_steps)
        self.plan.set_masks(masks)
        with torch.no_grad():
            allm = torch.cat([m.detach().reshape(-1) for m in masks])
            lo, hi = self.cfg.fractional_band
            stats = torch.stack([((allm > lo) & (allm < hi)).float().mean(), (allm > 0.5).float().mean()])
            fractional, kept = stats.tolist()  # one host sync per step (not per bisection iteration)
        self.last = {"tau": tau, "fractional": fractional, "kept_fraction": kept}

    def observe(self, step: int) -> None:
        """after_step hook: the escape rule (shrink tau faster while too many entries stay fractional)."""
        if self.temperature.observe(step, self.last.get("fractional", 0.0)):
            self.last["escape"] = 1.0

    # -- hard phase ----------------------------------------------------------------------------------
    def harden(self) -> list[Tensor]:
        """Hard masks from the final scores via `plan.select` (the soft phase's allocation) and apply them."""
        scores = [s.detach() for s in self.unit_scores()]
        self.hard = self.plan.select(scores, self.sparsity, self.allocation, self.min_keep)
        self.plan.set_masks(self.hard)
        return self.hard

    def squash_mask(self) -> nn.Module:
        assert self.hard is not None, "call harden() before squash_mask()"
        return self.plan.finalize(self.hard)


@dataclass
class SmartResult:
    module: nn.Module
    history: list[dict[str, float]]  # one entry per step: step, phase (0 soft, 1 fine-tune), tau, kept_fraction,
    #                                   fractional, loss
    hard_masks: list[Tensor] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class _PhaseProgress(StageProgress):
    """Maps one training phase onto [lo, hi] of the SMART stage, merging SMART's stats into each entry."""

    def __init__(self, outer: StageProgress | None, lo: float, hi: float,
                 record: Callable[[dict[str, Any]], dict[str, float]], log_every: int) -> None:
        super().__init__(outer.parent if outer is not None else Progress(), outer.name if outer else "smart", lo, hi)
        self.outer, self.record, self.log_every = outer, record, log_every

    def __call__(self, fraction: float, metrics: dict[str, Any] | None = None) -> None:
        entry = self.record(metrics or {})
        if self.outer is not None and (int(entry["step"]) % self.log_every == 0 or fraction >= 1.0):
            self.outer(self.start + (self.end - self.start) * fraction, entry)

    def check_cancel(self) -> None:
        if self.outer is not None:
            self.outer.check_cancel()


def run_smart(model: nn.Module, teacher: nn.Module | None, plan: PruningPlan, spec: PruneSpec, data: TrainData,
              stage_progress: StageProgress | None = None, config: SmartConfig | None = None) -> SmartResult:
    """Prune `model` (the plan's model) with SMART under `spec` (target_sparsity, steps, lr, seed...)."""
    cfg = config or SmartConfig()
    assert plan.model is model, "the plan must be built on the model being pruned"
    assert spec.target_sparsity is not None, "SMART needs target_sparsity"
    if cfg.device is not None:
        model.to(cfg.device)
        if teacher is not None:
            teacher.to(cfg.device)
    device = next(model.parameters()).device
    total = spec.steps
    soft_steps = round(total * cfg.soft_fraction) if total >= 2 else 0
    ft_steps = total - soft_steps
    pruner = SmartPruner(plan, spec.target_sparsity, soft_steps, cfg, spec.min_keep)
    scores = pruner.prepare(device)
    tcfg = TrainConfig(lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed, log_every=1)
    history: list[dict[str, float]] = []
    soft_share = soft_steps / total if total else 0.0

    def record(phase: int, offset: int) -> Callable[[dict[str, Any]], dict[str, float]]:
        def rec(metrics: dict[str, Any]) -> dict[str, float]:
            step = int(metrics.get("step", 0))
            if phase == 0:
                stats = {"tau": pruner.last.get("tau", 0.0), "fractional": pruner.last.get("fractional", 0.0),
                         "kept_fraction": pruner.last.get("kept_fraction", 0.0)}
            else:
                stats = {"tau": 0.0, "fractional": 0.0, "kept_fraction": hard_kept}
            entry = {"step": float(step + offset), "phase": float(phase), **stats,
                     "loss": float(metrics.get("loss", float("nan")))}
            history.append(entry)
            return entry
        return rec

    hard_kept = 0.0
    # One Adam for both phases: its moments carry over the hard switch. A fresh Adam's first update moves every
    # weight by the full lr (bias-corrected m / sqrt(v) = sign(g)), and a short fine-tuning phase spends its steps
    # undoing that. Digits, 100 steps, fidelity at 0.5 block sparsity (1x4 / 4x4 / 8x8): 0.093 / 0.102 / 0.115
    # with a fresh Adam, 0.086 / 0.090 / 0.103 with this (best magnitude 0.083 / 0.099 / 0.109); other cells
    # within a point (docs/benchmarks/quality.md). The scores get no gradient after the switch.
    score_group = {"params": scores, "lr": cfg.score_lr, "betas": cfg.score_betas, "weight_decay": 0.0}
    opt = make_optimizer(model, tcfg, [score_group])
    targets = predict(teacher, data.inputs) if teacher is not None else None  # both phases distil from these
    if soft_steps > 0:
        # no BatchNorm recalibration under soft masks: hardening changes the network at once, and the
        # fine-tuning phase (at least one step whenever there is a soft phase) recalibrates at its end
        soft_cfg = replace(tcfg, min_lr_ratio=cfg.soft_min_lr_ratio, bn_recalibration_samples=0)
        train_steps(
            model, teacher, data, soft_steps, soft_cfg,
            progress=_PhaseProgress(stage_progress, 0.0, soft_share, record(0, 0), cfg.log_every),
            optimizer=opt, teacher_outputs=targets, before_step=pruner.soft_step, after_step=pruner.observe,
        )
    hard = pruner.harden()
    n_groups = sum(m.numel() for m in hard)
    hard_kept = float(sum(float(m.sum()) for m in hard) / max(n_groups, 1))
    if ft_steps > 0:
        train_steps(model, teacher, data, ft_steps, tcfg, optimizer=opt, teacher_outputs=targets,
                    progress=_PhaseProgress(stage_progress, soft_share, 1.0, record(1, soft_steps), cfg.log_every))
    module = pruner.squash_mask()
    info = {"soft_steps": soft_steps, "finetune_steps": ft_steps, "escapes": pruner.temperature.escapes,
            "tau_final": pruner.temperature.tau(max(soft_steps - 1, 0)), "budget_k": pruner.k,
            "allocation": pruner.allocation,
            "group_sparsity": plan.group_sparsity(hard), "config": cfg.to_dict()}
    return SmartResult(module=module, history=history, hard_masks=hard, info=info)
