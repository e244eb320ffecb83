"""SMART knobs in one place, with the defaults that worked on the digits benchmark (bench/quality.py).

Defaults follow the reference experiment recorded in shared/papers/smart-pruner.md (SMART, Ding et al.,
arXiv 2403.19969; the paper does not publish its schedule values). Most digits numbers in the comments were measured
on the 8/16/32 CNN with the softened-KL distillation loss used until 2026-12-03 (TrainConfig.kd_loss="kl");
`channel_allocation`'s on the 16/32/64 CNN with logit matching, the benchmark's setting since then. The defaults
were re-checked on the full grid in that setting (docs/benchmarks/quality.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SmartConfig:
    # --- phases: dense start -> soft (joint w + scores, tau anneals) -> hard top-k -> fine-tune ---
    soft_fraction: float = 2 / 3  # share of the step budget spent in the soft phase; the rest fine-tunes
    # --- temperature (tau) schedule: exponential from tau_start to tau_end over the soft phase ---
    tau_start: float = 1.0  # scores are standardised, so tau = 1 makes the initial mask smooth (0.1 was worse)
    tau_end: float = 1e-3  # at this tau the soft mask is practically the hard top-k indicator
    anneal_fraction: float = 0.7  # tau reaches tau_end after this share of the soft phase, then stays there
    tau_min: float = 1e-6  # floor for the escape rule's extra shrinking (numerical safety)
    # --- escape rule for non-sparse local minima (dynamic temperature) ---
    escape_after: float = 0.5  # active in the second half of the soft phase only
    fractional_band: tuple[float, float] = (0.05, 0.95)  # a mask entry strictly inside is "fractional"
    fractional_limit: float = 0.01  # more than 1% fractional entries at a step -> shrink tau faster
    escape_factor: float = 0.9  # ... by multiplying a persistent tau correction by this
    soft_floors: str = "straight-through"  # the soft top-k keeps each layer's min_keep floor, as the hard
    #   selection does (geometry.select); "off": without it, at 0.97 block sparsity the soft phase trained whole
    #   layers at mask ~0 that the hard mask then had to keep; "exact": exact Jacobian, whose zero gradient on a
    #   bound layer's mean score pins that layer at its floor; "straight-through": floors in the forward, the
    #   global projection in the backward (topk.SoftTopKFloors.backward)
    floors_after: float = 0.5  # floors from this share of the soft phase on: before it the top-k is free, so
    #   budget moves between layers as in the paper; block 8x8 @ 0.95 / 0.97 on digits: 25% / 16% without
    #   floors, 37% / 37% with them throughout (but 59% vs 67% at 0.9), 47% / 36% from half-way (67% at 0.9)
    channel_allocation: str = "uniform"  # channel plans: "uniform" gives every dependency group the same kept
    #   fraction (a soft top-k per group: exact budgets, exact Jacobian) and SMART learns which channels; "global"
    #   is the paper's one top-k over all channels (learned per-layer widths). Why uniform: a channel mask scales
    #   the BatchNorm output, and the next conv's BatchNorm (train mode) undoes any common scale of a whole
    #   layer's soft mask, so the relaxation prices budget taken from such a layer at nothing, while the last
    #   layer (feeding the classifier) pays for it; "global" starved the inner layers (digits CNN 16/32/64 at 0.5:
    #   kept [10, 8, 38] vs uniform [8, 16, 32]) and lost to uniform magnitude (fidelity 0.232 vs 0.201 at 500
    #   steps; accuracy at 0.9, 500 steps, 69.8% vs 71.0%), while uniform SMART beat it (0.181; 81.9%).
    #   Block and N:M plans are unaffected (block: global, as in the paper; N:M: per M-run)
    # --- scores ---
    score_lr: float = 0.03  # Adam on scores; gradients scale as 1/tau, so SGD is unusable and 3e-3 barely moves
    score_betas: tuple[float, float] = (0.9, 0.999)
    soft_min_lr_ratio: float = 1.0  # the weight lr decays (cosine) to this share by the end of the soft phase;
    #   1.0 (constant) lets weights follow the masks as they harden near its end. 0.3 improved fidelity at 500
    #   steps (1x4 @ 0.97: 0.89 -> 0.76) but cost 11-15 points of accuracy at 100 steps and 0.95-0.97
    score_init: str = "auto"  # how group norms / sqrt(size) become scores (see pruner.init_scores):
    #   "global": standardised over all units (step 0 = global magnitude ranking); best for block on digits
    #   "layer": each unit divided by its mean first (relative magnitude: BN-followed layers are scale-free);
    #            best for channel on digits (47% vs 36% at 0.75, 100 steps, with one global channel budget)
    #   "unit": standardised per unit (starved the small first layer: 90% vs 95% global at 4x4 / 0.95)
    #   "auto": "layer" for channel plans, "global" otherwise
    # --- hard phase: masks stay parametrizations (w * mask), so Adam momentum cannot revive pruned weights ---
    device: str | None = None  # None: wherever the model lives (CUDA on the GPU worker, CPU otherwise)
    log_every: int = 10  # progress callback period (steps); the history keeps every step

    def __post_init__(self) -> None:
        assert 0.0 < self.soft_fraction < 1.0, f"soft_fraction must be in (0, 1), got {self.soft_fraction}"
        assert self.tau_start >= self.tau_end > 0, f"need tau_start >= tau_end > 0: {self.tau_start}, {self.tau_end}"
        assert 0 < self.escape_factor < 1, f"escape_factor must be in (0, 1), got {self.escape_factor}"
        lo, hi = self.fractional_band
        assert 0 < lo < hi < 1, f"fractional_band must satisfy 0 < lo < hi < 1, got {self.fractional_band}"
        assert self.score_init in ("auto", "global", "layer", "unit"), f"bad score_init {self.score_init!r}"
        assert self.soft_floors in ("off", "exact", "straight-through"), f"bad soft_floors {self.soft_floors!r}"
        assert 0 < self.anneal_fraction <= 1, f"anneal_fraction must be in (0, 1], got {self.anneal_fraction}"
        assert 0 < self.soft_min_lr_ratio <= 1, f"soft_min_lr_ratio must be in (0, 1], got {self.soft_min_lr_ratio}"
        assert 0 <= self.floors_after <= 1, f"floors_after must be in [0, 1], got {self.floors_after}"
        assert self.channel_allocation in ("uniform", "global"), f"bad channel_allocation {self.channel_allocation!r}"
        assert self.score_lr > 0, f"score_lr must be positive, got {self.score_lr}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
