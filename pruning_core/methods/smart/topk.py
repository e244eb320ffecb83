"""Differentiable top-k with an exact budget (SMART, Ding et al., arXiv 2403.19969, Sec. "differentiable top-k").

Soft mask f_i = sigmoid(m_i / tau + t), with the scalar shift t chosen so that sum_i f_i = k exactly.
t is found on the device with a fixed number of iterations (bisection, then Newton clamped to the
bracket; no `.item()`, no host sync). The global budget is solved in float64, so it holds to ~1e-9 even
for tau = 1e-3 and wide score ranges; short N:M rows in the scores' own precision (`_solve_short_rows`).
Scores are centred between the k-th and (k+1)-th largest values first, so arguments near the threshold are
O(1) and keep full precision however large m / tau is.

The bracket is tight, so few iterations suffice: with z_(k) the k-th largest argument, the root lies in
[-z_(k) - log(n - k), -z_(k+1) + log(k)] (below it the k - 1 largest terms plus n - k + 1 terms of at most
1 / (n - k + 1) sum to <= k; above it the k + 1 largest terms are each >= k / (k + 1)). After centring
its width is the k/k+1 gap plus log(k (n - k)), a few tens at most, instead of the whole score range / tau.

Backward is the implicit-differentiation Jacobian (t depends on m through the budget constraint):
    d f_i / d m_j = (1 / tau) * (delta_ij * s_i - s_i * s_j / sum_l s_l),   s_i = f_i (1 - f_i)
so the vector-Jacobian product is (1 / tau) * s * (g - <g, s> / sum(s)): O(N), no loops over groups.

Rows are independent problems: shape [R, N] with one budget k per row covers both the global top-k of
block / channel pruning (R = 1) and N:M pruning (R = number of M-runs, k = N).

`soft_topk_floors` adds per-layer floors, the soft counterpart of the hard selection's min_keep rule
(`geometry.select`: each unit keeps at least r_u groups, the rest of the budget goes to the best groups
anywhere). It is the exact KKT solution of the same problem with constraints sum_{i in u} f_i >= r_u:
f_i = sigmoid(z_i + max(t, s_u)), where s_u makes unit u alone sum to r_u. A unit whose floor binds
(s_u > t) is its own top-r_u problem; the others share the global shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

BISECTION_ITERS = 6  # halvings of the tight bracket (width / 64) before Newton
NEWTON_ITERS = 4  # then Newton clamped to the bracket: quadratic convergence to float64 precision
FLOOR_BISECTION_ITERS, FLOOR_NEWTON_ITERS = 12, 5  # the floors' problems (per-unit shifts; a global sum with
#   kinks) need more
# Stress set (tests/test_smart_topk.py::test_hard_score_distributions_keep_the_budget and its neighbours: 2000-
# and 20000-entry vectors, k = 1..n-1, ties, two far clusters, Cauchy tails, 4- and 8-runs; scores x1..x1000,
# tau 1..1e-3): worst |sum - k| 2e-12 with 6 + 4; one iteration fewer of either: 2e-12 (5 + 4) and 8e-9
# (6 + 3); 3 + 4 reached 3e-6 and 2 + 4 4e-2. Floors: 3e-7 with 12 + 5 (with 10 bisections: 1e-3).
# The loose bracket (score range / tau) needed 20 bisection + 6 Newton iterations; on small models op dispatch,
# not arithmetic, is what a SMART step pays, so every iteration counts.

SHORT_ROW = 8  # rows this short (N:M runs, M <= 8) are solved column-major, see `_solve_short_rows`
SHORT_ROW_CLIP = 40.0  # float32 short rows: centred arguments clipped here (no denormal sigmoids)

TINY_MASK = 1e-30  # mask values below this become exactly 0: float32 denormals (< 1.2e-38) made a SMART step at
# tau <= 0.02 up to 4x slower on CPU (weights x denormal masks in conv forward and backward); the budget moves by
# at most N * 1e-30

Evaluate = Callable[[Tensor, bool], tuple[Tensor, Tensor | None]]  # shift -> (mask sum, d sum / d shift)


def _find_root(evaluate: Evaluate, lo: Tensor, hi: Tensor, k: Tensor | float,
               bisections: int = BISECTION_ITERS, newtons: int = NEWTON_ITERS) -> Tensor:
    """Shift(s) with evaluate(t) = k for a sum increasing in t, the root bracketed by [lo, hi] (elementwise)."""
    # Bisection as a walk of the midpoint: after j halvings the root is within +-h0 / 2^j of t, and the next
    # midpoint is t -+ h0 / 2^(j+1) by the sign of the residual (one fused op instead of a compare and two
    # `where`s per iteration; at an exact root the sign is 0 and t stays).
    t, h0 = 0.5 * (lo + hi), 0.5 * (hi - lo)
    for j in range(1, bisections + 1):
        t = torch.addcmul(t, torch.sign(evaluate(t, False)[0] - k), h0, value=-(0.5**j))
    lo, hi = t - h0 * 0.5**bisections, t + h0 * 0.5**bisections
    for _ in range(newtons):
        total, slope = evaluate(t, True)
        assert slope is not None
        t = torch.clamp(torch.addcdiv(t, total - k, slope.clamp_min(torch.finfo(t.dtype).tiny), value=-1.0), lo, hi)
    return t


def _sigmoid_sums(z: Tensor, dim: int = -1) -> Evaluate:
    def evaluate(t: Tensor, with_slope: bool) -> tuple[Tensor, Tensor | None]:
        f = torch.sigmoid(z + t)
        slope = torch.addcmul(f, f, f, value=-1.0).sum(dim=dim, keepdim=True) if with_slope else None
        return f.sum(dim=dim, keepdim=True), slope
    return evaluate


def _bracket(z_k: Tensor, z_k1: Tensor, k: int, n: int) -> tuple[Tensor, Tensor]:
    """Bracket of the shift for budget k of n, from the k-th and (k+1)-th largest arguments (module docstring)."""
    return -z_k - math.log(n - k), -z_k1 + math.log(k)


def _centre(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """z shifted so the k-th and (k+1)-th largest of each row sit at +-d (precision); also the top k+1 values."""
    top = torch.topk(z, k + 1, dim=-1).values
    mid = 0.5 * (top[..., k - 1 : k] + top[..., k : k + 1])
    return z - mid, top - mid


def _kth_pair_of_columns(zt: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k-th and (k+1)-th largest of every column of a short [n, R] tensor, each [1, R]: odd-even transposition
    sort of the n rows (n passes of elementwise max / min over whole rows). For n = 4 this is 12 vector ops;
    `torch.topk` along a dimension of size 4 cost ~10x more (per-row kernel overhead)."""
    v = list(zt.unbind(0))
    n = len(v)
    for p in range(n):
        for i in range(p % 2, n - 1, 2):
            v[i], v[i + 1] = torch.maximum(v[i], v[i + 1]), torch.minimum(v[i], v[i + 1])
    return v[k - 1].unsqueeze(0), v[k].unsqueeze(0)


def _solve_short_rows(scores: Tensor, k: int, tau: float) -> Tensor:
    """Soft masks of many short rows ([R, n], n <= SHORT_ROW), returned column-major as [n, R].

    Same centring, bracket and iterations as the row-major path, on the transpose: the per-row sums, the
    shift's broadcast and the top-k of a [R, 4] tensor are reductions over a tiny innermost dimension, which
    PyTorch's CPU kernels run ~6x slower than the same arithmetic over contiguous rows of length R. Solved in
    the scores' own precision: a row sums only n <= 8 terms, so float32 keeps each within ~1e-6 of N (float64
    is for the global budget's thousands of terms) at half the cost. 2:4 on 10k runs, one thread, forward +
    backward: 5.5-7.5 ms -> 1.6-2.9 ms (docs/benchmarks/quality.md)."""
    n = scores.shape[-1]
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    zt = (scores.detach().to(dtype) / tau).t().contiguous()
    z_k, z_k1 = _kth_pair_of_columns(zt, k)
    mid = 0.5 * (z_k + z_k1)
    zt, z_k, z_k1 = zt - mid, z_k - mid, z_k1 - mid
    if dtype == torch.float32:
        # At low tau most arguments are far out, and sigmoid below -87 is a float32 denormal, which made every
        # solver op ~2x slower. Clipped at +-40 (clip is monotone, so the bracket stays right) the shift stays
        # within +-(40 + log k) and every sigmoid above 4e-36; a clipped entry's mask moves by < e^-40, below
        # float32's resolution near 0 and 1.
        c = SHORT_ROW_CLIP
        zt, z_k, z_k1 = zt.clamp_(-c, c), z_k.clamp(-c, c), z_k1.clamp(-c, c)
    lo, hi = _bracket(z_k, z_k1, k, n)
    return _flush_tiny(torch.sigmoid(zt + _find_root(_sigmoid_sums(zt, dim=0), lo, hi, float(k))))


def _flush_tiny(f: Tensor) -> Tensor:
    """In place on the solver's own fresh tensor."""
    return f.masked_fill_(f < TINY_MASK, 0.0)


def _project(grad: Tensor, f: Tensor, tau: float, group: Tensor | None, groups: int, dim: int = -1) -> Tensor:
    """(1 / tau) * s * (g - <g, s>_c / sum_c s) with s = f (1 - f), per row (rows along `dim`) or per group id c
    (flat)."""
    s = f * (1 - f)
    g = grad.to(f.dtype)
    tiny = torch.finfo(f.dtype).tiny
    if group is None:
        proj = (g * s).sum(dim=dim, keepdim=True) / s.sum(dim=dim, keepdim=True).clamp_min(tiny)
    else:
        num = torch.zeros(groups, dtype=f.dtype, device=f.device).index_add_(0, group, g * s)
        den = torch.zeros(groups, dtype=f.dtype, device=f.device).index_add_(0, group, s)
        proj = (num / den.clamp_min(tiny))[group]
    return (s * (g - proj) / tau).to(grad.dtype)


class SoftTopK(torch.autograd.Function):
    """scores [R, N] -> soft mask [R, N] in (0, 1), each row summing to k; gradient by implicit differentiation."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: int, tau: float) -> Tensor:
        assert scores.dim() == 2, f"scores must be [rows, N], got shape {tuple(scores.shape)}"
        assert tau > 0, f"temperature must be positive, got {tau}"
        n = scores.shape[-1]
        assert 0 < k < n, f"budget k={k} must be in (0, {n}) (k = 0 or N has no soft mask to learn)"
        ctx.tau = tau
        ctx.columns = scores.shape[0] > 1 and n <= SHORT_ROW
        if ctx.columns:  # N:M runs
            ft = _solve_short_rows(scores, k, tau)
            ctx.save_for_backward(ft)
            return ft.to(scores.dtype).t().contiguous()
        # float64: sums over thousands of entries must stay within 1e-4 of k; in float32 near-saturated rows
        # at tau = 1e-3 left the solver 7e-4 off (measured), and float32 was not measurably faster on CPU
        z, top = _centre(scores.detach().double() / tau, k)
        lo, hi = _bracket(top[..., k - 1 : k], top[..., k : k + 1], k, n)
        f = _flush_tiny(torch.sigmoid(z + _find_root(_sigmoid_sums(z), lo, hi, float(k))))
        ctx.save_for_backward(f)
        return f.to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (f,) = ctx.saved_tensors
        if ctx.columns:  # f is [n, R]: the same projection over columns (contiguous), handed back as [R, n]
            return _project(grad.t().contiguous(), f, ctx.tau, None, 0, dim=0).t().contiguous(), None, None
        return _project(grad, f, ctx.tau, None, 0), None, None


def soft_topk(scores: Tensor, k: int, tau: float) -> Tensor:
    """Soft top-k mask of a 1-D score vector (global budget) or of each row of a 2-D one (e.g. N:M runs)."""
    if scores.dim() == 1:
        out: Tensor = SoftTopK.apply(scores.unsqueeze(0), k, tau)
        return out.squeeze(0)
    out2: Tensor = SoftTopK.apply(scores, k, tau)
    return out2


# -- per-layer floors ---------------------------------------------------------------------------------------
class Floors:
    """Which unit each flat score belongs to and the fewest groups each unit keeps (host-side constants)."""

    def __init__(self, sizes: list[int], floors: list[int], device: torch.device | None = None,
                 exact_grad: bool = False) -> None:
        assert len(sizes) == len(floors) and sizes, "one floor per unit"
        self.exact_grad = exact_grad  # False: straight-through backward (see SoftTopKFloors.backward)
        assert all(1 <= r <= n for r, n in zip(floors, sizes, strict=True)), f"floors {floors} vs sizes {sizes}"
        self.sizes, self.floors, self.units = sizes, floors, len(sizes)
        self.total = sum(floors)
        self.seg = torch.repeat_interleave(torch.arange(self.units, device=device), torch.tensor(sizes, device=device))
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.full = torch.tensor([r >= n for r, n in zip(floors, sizes, strict=True)], device=device)
        # flat positions (in unit-major, descending-within-unit order) of each unit's r-th and (r+1)-th largest
        self.at_r = torch.tensor([o + r - 1 for o, r in zip(offsets, floors, strict=True)], device=device)
        self.at_r1 = torch.tensor([o + min(r, n - 1) for o, r, n in zip(offsets, floors, sizes, strict=True)],
                                  device=device)
        self.r = torch.tensor(floors, dtype=torch.float64, device=device)
        n_t = torch.tensor(sizes, dtype=torch.float64, device=device)
        # log(n - r) and log(r) of each unit's bracket; full units get a dummy 0-width bracket (their shift is +inf)
        self.log_rest = torch.where(self.full, 0.0, torch.log((n_t - self.r).clamp_min(1)))
        self.log_r = torch.log(self.r)

    def to(self, device: torch.device) -> Floors:
        if self.seg.device == device:
            return self
        return Floors(self.sizes, self.floors, device, self.exact_grad)

    def violated(self, mask: Tensor) -> bool:
        """Whether some unit of an unconstrained soft mask holds less than its floor (one host sync). If none
        does, the floored solution is that mask itself (every s_u <= t), so the floor solve can be skipped."""
        sums = torch.zeros(self.units, dtype=torch.float64, device=mask.device).index_add_(0, self.seg,
                                                                                              mask.double())
        return bool((sums < self.r - 1e-9).any())

    def unit_shifts(self, z: Tensor, bisections: int = FLOOR_BISECTION_ITERS,
                    newtons: int = FLOOR_NEWTON_ITERS) -> Tensor:
        """s[U]: the shift that makes each unit alone sum to its floor (+inf for units kept whole)."""
        order = torch.argsort(z, descending=True, stable=True)
        order = order[torch.argsort(self.seg[order], stable=True)]  # unit-major, descending within units
        zs = z[order]
        z_r, z_r1 = zs[self.at_r], zs[self.at_r1]
        lo = torch.where(self.full, 0.0, -z_r - self.log_rest)
        hi = torch.where(self.full, 0.0, -z_r1 + self.log_r)
        seg, units = self.seg, self.units

        def evaluate(t: Tensor, with_slope: bool) -> tuple[Tensor, Tensor | None]:
            f = torch.sigmoid(z + t[seg])
            total = torch.zeros(units, dtype=z.dtype, device=z.device).index_add_(0, seg, f)
            slope = torch.zeros(units, dtype=z.dtype, device=z.device).index_add_(0, seg, f - f * f) \
                if with_slope else None
            return total, slope

        s = _find_root(evaluate, lo, hi, self.r, bisections, newtons)
        return torch.where(self.full, math.inf, s)


class SoftTopKFloors(torch.autograd.Function):
    """Flat scores [N] -> soft mask [N] summing to k with at least floors[u] in every unit u, and whether any
    floor bound."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: int, tau: float, floors: Floors) -> tuple[Tensor, Tensor]:
        assert scores.dim() == 1, f"scores must be flat, got shape {tuple(scores.shape)}"
        assert tau > 0, f"temperature must be positive, got {tau}"
        n = scores.numel()
        assert 0 < k < n, f"budget k={k} must be in (0, {n})"
        z, top = _centre(scores.detach().double() / tau, k)
        s_u = floors.unit_shifts(z)[floors.seg]
        free_k = k - floors.total  # budget left once every floor is met
        if free_k <= 0:  # the floors take the whole budget (as in geometry.select): every unit is its own problem
            t = torch.full((1,), -math.inf, dtype=z.dtype, device=z.device)
        else:
            # sum(t) <= floors + sum sigmoid(z + t) and >= sum sigmoid(z + t): brackets for free_k and k
            lo = -top[free_k - 1 : free_k] - math.log(n - free_k)
            hi = -top[k : k + 1] + math.log(k)

            def evaluate(t: Tensor, with_slope: bool) -> tuple[Tensor, Tensor | None]:
                free = t > s_u
                f = torch.sigmoid(z + torch.where(free, t, s_u))
                slope = torch.where(free, f - f * f, 0.0).sum(0, keepdim=True) if with_slope else None
                return f.sum(0, keepdim=True), slope

            t = _find_root(evaluate, lo, hi, float(k), FLOOR_BISECTION_ITERS, FLOOR_NEWTON_ITERS)
        bound = s_u > t  # this unit's floor binds: it is its own top-r problem (group id = unit)
        f = _flush_tiny(torch.sigmoid(z + torch.where(bound, s_u, t)))
        group = torch.where(bound, floors.seg, floors.units) if floors.exact_grad else None  # None: one global group
        ctx.save_for_backward(f, group)
        ctx.tau, ctx.groups = tau, floors.units + 1
        any_bound = bound.any()
        ctx.mark_non_differentiable(any_bound)
        return f.to(scores.dtype), any_bound

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_bound: Tensor | None = None) -> tuple[Tensor, None, None, None]:
        """Exact Jacobian (`exact_grad`), or straight-through the floors: one global projection as if no floor
        bound. The exact gradient of a bound unit's mean score is zero (its floor, not the budget, fixes its
        sum), so a layer once pinned at its floor can never win budget back (measured on block 8x8 / 0.9:
        the last conv stayed at its 1-tile floor, 46% accuracy vs 67% without floors); straight-through
        keeps telling it whether more budget would help."""
        f, group = ctx.saved_tensors
        return _project(grad, f, ctx.tau, group, ctx.groups), None, None, None


class SoftTopKPerUnit(torch.autograd.Function):
    """Flat scores [N] -> soft mask with exactly `units.floors[u]` in every unit u: one independent top-k per unit
    (SMART's channel budgets per dependency group), exact per-unit Jacobian."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, tau: float, units: Floors) -> Tensor:
        assert scores.dim() == 1 and scores.numel() == int(units.seg.numel()), "flat scores, one per group"
        assert tau > 0, f"temperature must be positive, got {tau}"
        z = scores.detach().double() / tau
        # each unit is a plain top-k problem (smooth, monotone sum, tight bracket from its own r-th and (r+1)-th
        # values), so the plain solver's 6 + 4 iterations suffice; the floors' 12 + 5 are for the global sum's kinks
        shift = units.unit_shifts(z, BISECTION_ITERS, NEWTON_ITERS)
        f = _flush_tiny(torch.sigmoid(z + shift[units.seg]))
        ctx.save_for_backward(f)
        ctx.tau, ctx.seg, ctx.units = tau, units.seg, units.units
        return f.to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (f,) = ctx.saved_tensors
        return _project(grad, f, ctx.tau, ctx.seg, ctx.units), None, None


def soft_topk_per_unit(scores: Tensor, tau: float, units: Floors) -> Tensor:
    """Soft top-k of flat scores with an exact budget per unit (`units.floors`), the units independent."""
    out: Tensor = SoftTopKPerUnit.apply(scores, tau, units.to(scores.device))
    return out


def soft_topk_floors_bound(scores: Tensor, k: int, tau: float, floors: Floors) -> tuple[Tensor, Tensor]:
    """`soft_topk_floors` and whether some floor bound (a 0-d bool tensor; when none did, the mask is the plain
    `soft_topk` one)."""
    out: tuple[Tensor, Tensor] = SoftTopKFloors.apply(scores, k, tau, floors.to(scores.device))
    return out


def soft_topk_floors(scores: Tensor, k: int, tau: float, floors: Floors) -> Tensor:
    """Soft top-k of flat scores with per-unit floors (the soft form of min_keep; module docstring)."""
    return soft_topk_floors_bound(scores, k, tau, floors)[0]
