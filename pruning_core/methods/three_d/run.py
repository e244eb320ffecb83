"""3D pruning entry point: samples -> low-rank polynomial -> budgeted solve -> prune original -> fine-tune.

Implements "Accelerate CNNs from Three Dimensions: A Comprehensive Pruning Framework", Wang et al., ICML 2021
(arXiv 2010.04879), with the corrections of `shared/papers/3d-pruning.md`: real MACs of the rounded candidate
decide feasibility, not d * w^2 * r^2.

Coordinates (all kept fractions in (0, 1]):
  d = 1 - removed residual blocks / removable residual blocks (stem, transitions and head are not removable)
  w = kept output channels of the originally prunable layers / their original count
  r = new input height / original input height
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from pruning_core.data import TrainData
from pruning_core.errors import InvalidRequest
from pruning_core.methods.three_d.depth import rank_blocks
from pruning_core.methods.three_d.poly import LowRankPoly, fit_error, fit_low_rank
from pruning_core.methods.three_d.resolution import candidate_sizes, unwrap
from pruning_core.methods.three_d.sampling import (
    Builder,
    ChainConfig,
    Evaluator,
    Sample,
    _sub,
    measure_points,
    run_chains,
)
from pruning_core.methods.three_d.solve import Candidate, SolveResult, solve_budget
from pruning_core.methods.three_d.width import ChannelScorer, kept_counts, magnitude_scores, smart_scorer
from pruning_core.progress import StageProgress
from pruning_core.spec import PruneSpec
from pruning_core.train import TrainConfig

AXES = ("depth", "width", "resolution")


@dataclass
class ThreeDConfig:
    axes: tuple[str, ...] = AXES  # restrict to one axis for single-dimension baselines
    chains: ChainConfig = field(default_factory=ChainConfig)
    degree: int = 2  # K: degree of each single-variable factor (the paper uses 2-3)
    rank: int = 1  # R: rank-1 is identifiable from axis chains alone; R >= 2 needs combined samples
    holdout_points: int = 2  # combined (d, w, r) points measured only for the fit error
    val_fraction: float = 0.2  # held-out part of the data for scores
    width_grid: int = 24  # kept-channel fractions tried by the solver, evenly spaced in [min_width, 1]
    min_width: float = 0.1
    min_resolution: float = 0.25  # smallest input side fraction considered
    max_macs_evals: int = 40  # candidates built to measure real MACs before the fallback
    budget_floor: float = 0.85  # chosen MACs must land in [floor * budget, budget] (the paper's equality, banded)
    search: str = "poly"  # "poly": maximise the fitted F; "macs": largest real MACs under budget (no samples)
    final_steps: int | None = None  # fine-tuning of the final model; None: spec.steps
    channel_scores: str = "smart"  # which channels go: "smart" (learned SMART scores, issue 5) | "magnitude"
    smart_steps: int = 30  # "smart": soft-phase steps spent learning the scores at each width pruning
    scorer: ChannelScorer | None = None  # a custom scorer overrides channel_scores
    presampled: PreSampled | None = None  # reuse another run's samples (they do not depend on the target)


@dataclass
class PreSampled:
    """The target-independent part of a run: chain samples, held-out points and the depth removal order."""

    samples: list[Sample]
    holdout: list[Sample]
    order: list[str]


@dataclass
class ThreeDResult:
    module: nn.Module  # pruned and fine-tuned; takes `input_shape` directly (no resize inside)
    input_shape: list[int]
    plan3d: dict[str, Any]
    samples: list[Sample]
    solve: SolveResult
    presampled: PreSampled | None  # pass as `ThreeDConfig.presampled` to solve another target without resampling


def _example(shape: list[int], data: TrainData) -> torch.Tensor:
    if list(data.inputs.shape[1:]) == list(shape[1:]):
        return data.inputs[:1].clone()
    return torch.randn([1, *shape[1:]], generator=torch.Generator().manual_seed(0))


def _holdout_points(builder: Builder, cfg: ThreeDConfig, sizes: list[tuple[int, ...]], axes: tuple[str, ...],
                    seed: int) -> list[tuple[int, float, tuple[int, ...]]]:
    """Interior combined points (two or three axes pruned at once), seeded."""
    rng = np.random.default_rng(seed)
    ks = list(range(1, builder.n_blocks)) if "depth" in axes and builder.n_blocks > 1 else [0]
    ws = [0.5, 0.65, 0.8] if "width" in axes and builder.width_units else [1.0]
    rs = sizes[1:-1] if "resolution" in axes and len(sizes) > 2 else [sizes[0]]
    pts: list[tuple[int, float, tuple[int, ...]]] = []
    for _ in range(cfg.holdout_points * 4):
        p = (int(rng.choice(ks)), float(rng.choice(ws)), tuple(rs[int(rng.integers(len(rs)))]))
        pruned_axes = (p[0] > 0) + (p[1] < 1) + (p[2] != sizes[0])
        if p not in pts and pruned_axes >= 2:
            pts.append(p)
        if len(pts) >= cfg.holdout_points:
            break
    return pts


def run_3d(model: nn.Module, teacher: nn.Module | None, example_input_shape: list[int], spec: PruneSpec,
           data: TrainData, stage_progress: StageProgress | None = None,
           config: ThreeDConfig | None = None) -> ThreeDResult:
    """Prune `model` in depth, width and resolution to keep `spec.flops_target` of its MACs."""
    cfg = config or ThreeDConfig()
    per_point = cfg.chains.steps_per_point
    if per_point is None:  # short fine-tuning per sample, scaled with the job's step budget
        per_point = max(5, spec.steps // 10)
        cfg = dataclasses.replace(cfg, chains=dataclasses.replace(cfg.chains, steps_per_point=per_point))
    if spec.flops_target is None or not 0.0 < spec.flops_target < 1.0:
        raise InvalidRequest("method 3d needs flops_target, the kept fraction of FLOPs, in (0, 1)")
    bad = set(cfg.axes) - set(AXES)
    assert not bad, f"unknown axes {sorted(bad)}"
    teacher = teacher if teacher is not None else copy.deepcopy(model).eval()
    x = _example(example_input_shape, data)
    if cfg.channel_scores not in ("magnitude", "smart"):
        raise InvalidRequest(f"channel_scores must be 'magnitude' or 'smart', got {cfg.channel_scores!r}")
    train, val = data.split(cfg.val_fraction, spec.seed)
    tcfg = TrainConfig(lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    scorer = cfg.scorer or (
        smart_scorer(teacher, train, cfg.smart_steps, tcfg) if cfg.channel_scores == "smart"
        else magnitude_scores)
    builder = Builder(model, x, spec.profile, scorer, spec.min_keep)
    sizes: list[tuple[int, ...]] = (
        candidate_sizes(model, x, cfg.min_resolution) if "resolution" in cfg.axes else [builder.full])
    available = tuple(a for a in cfg.axes if {"depth": builder.n_blocks > 0, "width": builder.width_units > 0,
                                               "resolution": len(sizes) > 1}[a])
    if not available:
        raise InvalidRequest(
            f"3d pruning found nothing to prune along {', '.join(cfg.axes)}: no residual blocks with an identity "
            "skip, no prunable channel groups, and no smaller input size the model accepts (it needs global "
            "pooling before its head)")
    ev = Evaluator(teacher, train, val, tcfg)
    dense_macs = builder.macs(model)
    budget = spec.flops_target * dense_macs

    # 1. samples: chains per axis (+ dense point), then held-out combined points for the fit error.
    samples: list[Sample] = []
    order = [b.name for b in builder.blocks]
    holdout: list[Sample] = []
    poly: LowRankPoly | None = None
    fit_err: dict[str, Any] = {}
    if cfg.search == "poly" and cfg.presampled is not None:
        samples, holdout = list(cfg.presampled.samples), list(cfg.presampled.holdout)
        order = list(cfg.presampled.order)
    elif cfg.search == "poly":
        samples, chain_order = run_chains(builder, ev, cfg.chains, available, sizes, spec.seed,
                                          _sub(stage_progress, 0.0, 0.4))
        order = chain_order + [n for n in order if n not in chain_order]
        if len(available) >= 2 and cfg.holdout_points:
            pts = _holdout_points(builder, cfg, sizes, available, spec.seed)
            holdout = measure_points(builder, ev, pts, order, per_point, spec.seed, "combined",
                                     _sub(stage_progress, 0.4, 0.5))
    if cfg.search != "poly" and "depth" in available:
        # No chain: rank the blocks once on the original model by the same criterion.
        assert isinstance(model, fx.GraphModule), "residual blocks are only found in fx graphs"
        order = [b.name for b in rank_blocks(model, builder.blocks, train.inputs[:64])]
    if cfg.search == "poly":
        xs = np.array([[s.d, s.w, s.r] for s in samples])
        ys = np.array([s.score for s in samples])
        chain_fit = fit_low_rank(xs, ys, cfg.degree, cfg.rank, seed=spec.seed)
        fit_err = {"heldout": fit_error(chain_fit, np.array([[s.d, s.w, s.r] for s in holdout]).reshape(-1, 3),
                                        np.array([s.score for s in holdout])),
                   "train": fit_error(chain_fit, xs, ys),
                   "note": "error of the fit on the chain samples, measured on the held-out combined points; "
                           "the solver then uses the fit on all samples"}
        all_s = samples + holdout
        poly = fit_low_rank(np.array([[s.d, s.w, s.r] for s in all_s]), np.array([s.score for s in all_s]),
                            cfg.degree, cfg.rank, seed=spec.seed)

    # 2. solve over the rounded candidates with real MACs.
    candidates = _candidates(builder, cfg, sizes, available, spec.min_keep)
    depth_macs = _depth_macs(builder, order, available)
    fw = _width_factor(samples)

    def estimate(c: Candidate) -> float:
        return dense_macs * depth_macs[c.blocks_removed] * fw(c.w) * (c.r ** 2)

    def real(c: Candidate) -> int:
        # MACs depend on how many channels go, not which: magnitude scores build it fast.
        return builder.macs(builder.build(order[: c.blocks_removed], c.keep, c.size, scorer=magnitude_scores))

    def predict(c: Candidate, fitted: LowRankPoly | None = poly) -> float:
        return estimate(c) if fitted is None else fitted(c.d, c.w, c.r)

    sol = solve_budget(candidates, predict, estimate, real, budget, max_evals=cfg.max_macs_evals,
                       floor=cfg.budget_floor)
    solved = _sub(stage_progress, 0.5, 0.55)
    if solved is not None:
        solved(1.0, {"chosen": sol.best.to_dict(), "predicted": sol.predicted, "macs": sol.macs})

    # 3. final: prune the original to the chosen point and fine-tune with the full budget.
    best = sol.best
    final = builder.build(order[: best.blocks_removed], best.keep, best.size)
    ev.finetune(final, spec.steps if cfg.final_steps is None else cfg.final_steps, spec.seed,
                _sub(stage_progress, 0.55, 1.0))
    achieved = ev.score(final)
    d, w, r = builder.coords(final, best.blocks_removed)
    final_macs = builder.macs(final)
    assert final_macs == sol.macs, f"final model MACs {final_macs} differ from the solver's {sol.macs}"
    inner, size = unwrap(final)
    input_shape = list(example_input_shape[:2]) + [int(s) for s in (size or builder.full)]
    resized = size is not None
    plan3d: dict[str, Any] = {
        "depth": d, "width": w, "resolution": r,
        "input_shape": input_shape,
        "original_input_shape": list(example_input_shape),
        "inputs_must_be_resized": resized,
        "resize_note": (
            f"The pruned model takes {'x'.join(map(str, input_shape))} inputs instead of "
            f"{'x'.join(map(str, example_input_shape))}: resize every input (bilinear) before "
            "calling it." if resized else "The input size is unchanged."),
        "axes": list(available),
        "blocks": {"removable": [b.to_dict() for b in builder.blocks], "removed": order[: best.blocks_removed],
                   "criterion": "relative branch norm ||f(x)|| / ||x|| on calibration data, re-ranked after each "
                                "fine-tuned removal in the depth chain; smaller is removed first"},
        "channels": {"scorer": "custom" if cfg.scorer is not None else cfg.channel_scores, "keep_asked": best.keep,
                     "channel_multiple": spec.profile.channel_multiple},
        "score_metric": ev.metric,
        "samples": [s.to_dict() for s in samples],
        "holdout": [s.to_dict() for s in holdout],
        "fit_error": fit_err,
        "model": poly.to_dict() if poly is not None else None,
        "predicted": sol.predicted if poly is not None else None,
        "achieved": achieved,
        "macs": {"dense": dense_macs, "pruned": final_macs, "budget": int(budget),
                 "kept_fraction": final_macs / dense_macs, "target": spec.flops_target},
        "solver": {"candidates": sol.candidates, "measured": len(sol.evaluated), "search": cfg.search},
    }
    inner.eval()
    pre = PreSampled(samples, holdout, order) if cfg.search == "poly" else None
    return ThreeDResult(inner, input_shape, plan3d, samples + holdout, sol, pre)


def _candidates(builder: Builder, cfg: ThreeDConfig, sizes: list[tuple[int, ...]], axes: tuple[str, ...],
                min_keep: float) -> list[Candidate]:
    ks = range(builder.n_blocks + 1) if "depth" in axes else range(1)
    keeps = list(np.linspace(cfg.min_width, 1.0, cfg.width_grid)) if "width" in axes else [1.0]
    szs = sizes if "resolution" in axes else [sizes[0]]
    counts = kept_counts(builder.model, builder.x, [float(k) for k in keeps], builder.profile, min_keep)
    widths = {k: (kept / total if total else 1.0) for k, (kept, total) in counts.items()}
    # Distinct achieved widths only (rounding maps several asked fractions onto one channel count).
    by_w: dict[float, float] = {}
    for keep, w in sorted(widths.items()):
        by_w.setdefault(round(w, 6), keep)
    out = []
    for k in ks:
        d = 1.0 - k / builder.n_blocks if builder.n_blocks else 1.0
        for w, keep in by_w.items():
            for s in szs:
                r = s[0] / builder.full[0] if builder.full else 1.0
                out.append(Candidate(k, keep, tuple(s), d, w, r))
    return out


def _depth_macs(builder: Builder, order: list[str], axes: tuple[str, ...]) -> list[float]:
    """Kept MAC fraction after removing the first k blocks of `order`, measured for every k."""
    if "depth" not in axes:
        return [1.0]
    dense = builder.macs(builder.model)
    return [builder.macs(builder.build(order[:k], 1.0, ())) / dense for k in range(builder.n_blocks + 1)]


def _width_factor(samples: list[Sample]) -> Any:
    """MAC fraction as a function of w, interpolated from the width chain; w^2 without one."""
    pts = sorted({(s.w, s.macs) for s in samples if s.axis in ("dense", "width")})
    if len(pts) < 3:
        return lambda w: w * w
    ws = np.array([p[0] for p in pts])
    ms = np.array([p[1] for p in pts], dtype=np.float64) / pts[-1][1]
    return lambda w: float(np.interp(w, ws, ms, left=ms[0] * (w / ws[0]) ** 2))
