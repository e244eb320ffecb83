"""Data collection: one pruning chain per axis with short fine-tuning after each step.

Wang et al., ICML 2021 (arXiv 2010.04879), "data collection": prune step by step along one dimension, briefly
fine-tune, record (d, w, r, score), continue from the fine-tuned model. Each chain holds the other two axes at
1, so three chains plus the unpruned point pin a rank-1 model (see `poly`). Held-out combined points are
built from the original model directly and only used to measure the fit error.

`Builder` makes every model the search touches from the original: the same code builds chain steps,
held-out points, solver candidates (for their real MACs) and the final model, so rounding is identical.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from pruning_core.accelerators import AcceleratorProfile
from pruning_core.data import TrainData
from pruning_core.geometry import build_plan
from pruning_core.macs import count_macs
from pruning_core.methods.three_d.depth import ResidualBlock, find_residual_blocks, rank_blocks, remove_blocks
from pruning_core.methods.three_d.resolution import ResizeInput, round_size, unwrap
from pruning_core.methods.three_d.width import ChannelScorer, magnitude_scores, prune_width
from pruning_core.progress import StageProgress
from pruning_core.train import TrainConfig, is_logits, predict, train_steps


@dataclass
class Sample:
    d: float
    w: float
    r: float
    macs: int
    score: float
    axis: str  # "dense" | "depth" | "width" | "resolution" | "combined" (held-out)
    detail: dict[str, Any] = field(default_factory=dict)  # blocks removed / kept channels / input size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Builder:
    """Builds (blocks removed, channel keep, input size) candidates from the original model and measures them."""

    def __init__(self, model: nn.Module, example_input: Tensor, profile: AcceleratorProfile,
                 scorer: ChannelScorer = magnitude_scores, min_keep: float = 0.05) -> None:
        self.model = model
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.x = example_input[:1].detach().clone().to(self.device)
        self.profile = profile
        self.scorer = scorer
        self.min_keep = min_keep
        self.full: tuple[int, ...] = tuple(self.x.shape[2:]) if self.x.ndim == 4 else ()
        self.blocks: list[ResidualBlock] = (
            find_residual_blocks(model, self.x) if isinstance(model, fx.GraphModule) else [])
        plan = build_plan(copy.deepcopy(model), self.x, "channel", profile)
        self.width_units = len(plan.units)
        mods = dict(model.named_modules())
        self.channels = {r.name: _out_channels(mods[r.name]) for r in plan.layers if r.prunable}

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def input_for(self, size: tuple[int, ...]) -> Tensor:
        if not size or tuple(size) == self.full:
            return self.x
        return torch.zeros((1, self.x.shape[1], *size), device=self.device)

    def build(self, removed: Sequence[str], keep: float, size: tuple[int, ...],
              base: nn.Module | None = None, scorer: ChannelScorer | None = None) -> nn.Module:
        """`base` (default: the original) with `removed` blocks gone, `keep` channels kept, run at `size`."""
        m, _ = unwrap(base if base is not None else self.model)
        if removed:
            assert isinstance(m, fx.GraphModule), "removing blocks needs an fx graph"
            m = remove_blocks(m, removed)
        else:
            m = copy.deepcopy(m)
        if keep < 1.0 and self.width_units:
            m = prune_width(m, self.x, keep, self.profile, scorer or self.scorer, self.min_keep).module
        if size and tuple(size) != self.full:
            return ResizeInput(m, (int(size[0]), int(size[1])))
        return m

    def width_of(self, module: nn.Module) -> float:
        """Kept fraction of the original prunable layers' output channels (layers a removed block took are skipped)."""
        inner, _ = unwrap(module)
        mods = dict(inner.named_modules())
        common = [n for n in self.channels if n in mods]
        orig = sum(self.channels[n] for n in common)
        return sum(_out_channels(mods[n]) for n in common) / orig if orig else 1.0

    def coords(self, module: nn.Module, removed: int) -> tuple[float, float, float]:
        _inner, size = unwrap(module)
        d = 1.0 - removed / self.n_blocks if self.n_blocks else 1.0
        r = size[0] / self.full[0] if size is not None and self.full else 1.0
        return d, self.width_of(module), r

    def macs(self, module: nn.Module) -> int:
        inner, size = unwrap(module)
        return count_macs(inner, self.input_for(size or self.full))


def _out_channels(m: nn.Module) -> int:
    w = getattr(m, "weight", None)
    assert isinstance(w, Tensor), f"{type(m).__name__} has no weight"
    return int(w.shape[0])


class Evaluator:
    """Short fine-tuning (distillation from the dense teacher, plus CE with labels) and the sample score.

    Score = accuracy on the held-out split when labels exist, else top-1 agreement with the teacher
    (classifiers) or 1 - relative L2 to the teacher's outputs (anything else).
    """

    def __init__(self, teacher: nn.Module, train: TrainData, val: TrainData, cfg: TrainConfig) -> None:
        self.teacher, self.train, self.val, self.cfg = teacher, train, val, cfg
        self.ref = predict(teacher, val.inputs)[0]
        self.targets = predict(teacher, train.inputs)  # every fine-tuning run distils from these (one pass)
        if val.labels is not None and is_logits(self.ref):
            self.metric = "accuracy"
        elif is_logits(self.ref):
            self.metric = "top1_agreement"
        else:
            self.metric = "1-rel_l2"

    def finetune(self, model: nn.Module, steps: int, seed: int, progress: StageProgress | None = None) -> None:
        cfg = copy.copy(self.cfg)
        cfg.seed = seed
        train_steps(model, self.teacher, self.train, steps, cfg, progress=progress, teacher_outputs=self.targets)

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        out = predict(model, self.val.inputs)[0]
        if self.metric == "accuracy":
            assert self.val.labels is not None
            return float((out.argmax(1) == self.val.labels).float().mean())
        if self.metric == "top1_agreement":
            return float((out.argmax(1) == self.ref.argmax(1)).float().mean())
        return max(0.0, 1.0 - float((out - self.ref).norm() / self.ref.norm().clamp_min(1e-12)))


def _calibration(data: TrainData, n: int = 64) -> Tensor:
    return data.inputs[:n]


@dataclass
class ChainConfig:
    depth_steps: int = 4  # depth-chain steps; blocks are removed in near-equal portions (1 per step if few)
    width_levels: tuple[float, ...] = (0.75, 0.55, 0.4, 0.25)  # kept channel fraction after each width step
    resolution_levels: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35)  # kept input side after each step
    steps_per_point: int | None = None  # fine-tuning after each chain step; None: max(5, job steps // 10)


def _sub(progress: StageProgress | None, a: float, b: float) -> StageProgress | None:
    if progress is None:
        return None
    span = progress.end - progress.start
    return StageProgress(progress.parent, progress.name, progress.start + span * a, progress.start + span * b)


def run_chains(builder: Builder, ev: Evaluator, cfg: ChainConfig, axes: Sequence[str], sizes: Sequence[tuple[int, ...]],
               seed: int, progress: StageProgress | None = None) -> tuple[list[Sample], list[str]]:
    """The dense point plus one chain per axis in `axes`. Returns the samples and the depth removal order."""
    samples = [Sample(1.0, 1.0, 1.0, builder.macs(builder.model), ev.score(builder.model), "dense")]
    plan: list[tuple[str, int]] = []
    if "depth" in axes and builder.n_blocks:
        n = builder.n_blocks
        counts = sorted({int(c) for c in np.round(np.linspace(0, n, min(cfg.depth_steps, n) + 1))[1:]})
        plan += [("depth", c) for c in counts]
    if "width" in axes and builder.width_units:
        plan += [("width", i) for i in range(len(cfg.width_levels))]
    res_sizes: list[tuple[int, ...]] = []
    if "resolution" in axes and len(sizes) > 1:
        for level in cfg.resolution_levels:
            want = round_size(builder.full[0], builder.full[1], level, 1)
            fit = [s for s in sizes if s[0] <= want[0]]
            s = fit[0] if fit else sizes[-1]
            if s != tuple(builder.full) and s not in res_sizes:
                res_sizes.append(s)
        plan += [("resolution", i) for i in range(len(res_sizes))]
    assert cfg.steps_per_point is not None, "run_3d resolves steps_per_point before sampling"
    order: list[str] = []
    current: dict[str, nn.Module] = {}
    calib = _calibration(ev.train)
    for i, (axis, arg) in enumerate(plan):
        prog = _sub(progress, i / len(plan), (i + 1) / len(plan))
        base = current.get(axis, builder.model)
        if axis == "depth":
            g = base
            assert isinstance(g, fx.GraphModule), "the depth chain works on fx graphs"
            model: nn.Module
            remaining = find_residual_blocks(g, builder.x)
            take = arg - len(order)
            ranked = rank_blocks(g, remaining, calib)  # re-ranked on the fine-tuned model at each step
            names = [b.name for b in ranked[:take]]
            order += names
            model = remove_blocks(g, names)
            detail: dict[str, Any] = {"blocks_removed": list(order)}
            removed = len(order)
        elif axis == "width":
            w_now = builder.width_of(base)
            model = builder.build([], cfg.width_levels[arg] / w_now, (), base=base)
            detail, removed = {}, 0
        else:
            inner, _ = unwrap(base)
            if inner is builder.model:  # the chain's first step: never fine-tune the caller's model in place
                inner = copy.deepcopy(inner)
            model = ResizeInput(inner, (int(res_sizes[arg][0]), int(res_sizes[arg][1])))
            detail, removed = {"input_size": list(res_sizes[arg])}, 0
        ev.finetune(model, cfg.steps_per_point, seed + i, prog)
        d, w, r = builder.coords(model, removed)
        if axis == "width":
            detail["kept_channels"] = round(w, 4)
        samples.append(Sample(d, w, r, builder.macs(model), ev.score(model), axis, detail))
        current[axis] = model
    return samples, order


def measure_points(builder: Builder, ev: Evaluator, points: Sequence[tuple[int, float, tuple[int, ...]]],
                   order: Sequence[str], steps: int, seed: int, axis: str,
                   progress: StageProgress | None = None,
                   on_model: Callable[[nn.Module], None] | None = None) -> list[Sample]:
    """Build each (blocks removed, keep, size) from the original, fine-tune `steps`, and score it."""
    out = []
    for i, (k, keep, size) in enumerate(points):
        model = builder.build(order[:k], keep, size)
        ev.finetune(model, steps, seed + 1000 + i, _sub(progress, i / len(points), (i + 1) / len(points)))
        d, w, r = builder.coords(model, k)
        out.append(Sample(d, w, r, builder.macs(model), ev.score(model), axis,
                          {"blocks_removed": list(order[:k]), "keep": keep, "input_size": list(size)}))
        if on_model is not None:
            on_model(model)
    return out
