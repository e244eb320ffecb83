"""Hard mask selection under a group budget, honouring each geometry.

* N:M units: exactly N of every run of M (the pattern fixes the sparsity; `sparsity` is ignored for them).
* Other units: kept counts k_u with k_u >= ceil(min_keep * G_u) and >= 1 (never delete a layer), and for
  channel units k_u a multiple of `channel_multiple` or all G_u channels.
  - `uniform`: k_u ~= (1 - s) * G_u in every unit.
  - `global`: one ranking across units (the caller makes scores comparable) with the total budget
    K = round((1 - s) * sum G_u); the minimum per unit is reserved first, then the best remaining groups
    fill the budget. Channel counts are rounded down to multiples, then the budget left is handed out one
    multiple at a time to the unit whose next multiple scores best (so the total is within one multiple).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pruning_core.errors import InvalidRequest
from pruning_core.geometry.units import PruningUnit


def min_kept(unit: PruningUnit, min_keep: float) -> int:
    """The fewest groups a unit may keep: min_keep of them, at least one, rounded up to the multiple."""
    g, step = unit.num_groups, max(1, unit.channel_multiple)
    k = max(1, math.ceil(min_keep * g - 1e-9))
    return min(g, math.ceil(k / step) * step)


def _round_multiple(k: float, unit: PruningUnit) -> int:
    step = max(1, unit.channel_multiple)
    r = round(k / step) * step
    return min(unit.num_groups, r)


def uniform_counts(units: Sequence[PruningUnit], sparsity: float, min_keep: float) -> list[int]:
    """Kept groups per (non-N:M) unit under `uniform` allocation: ~(1 - s) of each, rounded, at least its minimum."""
    return [max(min_kept(u, min_keep), _round_multiple((1.0 - sparsity) * u.num_groups, u)) for u in units]


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    mask = torch.zeros(scores.numel(), device=scores.device)
    if k > 0:
        mask[torch.topk(scores, k, sorted=False).indices] = 1.0
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Exactly n ones in every consecutive run of m scores."""
    runs = scores.reshape(-1, m)
    mask = torch.zeros_like(runs, dtype=torch.float32)
    mask.scatter_(1, torch.topk(runs, n, dim=1).indices, 1.0)
    return mask.reshape(-1)


def _global_counts(units: Sequence[PruningUnit], scores: Sequence[Tensor], keep_total: int,
                   mins: list[int]) -> list[int]:
    """Per-unit kept counts from one ranking, with each unit's minimum reserved."""
    rest_scores, rest_owner = [], []
    for i, (s, k0) in enumerate(zip(scores, mins, strict=True)):
        srt = torch.sort(s.detach().float().cpu(), descending=True).values
        rest_scores.append(srt[k0:])
        rest_owner.append(torch.full((srt.numel() - k0,), i, dtype=torch.long))
    counts = list(mins)
    budget = keep_total - sum(mins)
    if budget > 0:
        all_s, owner = torch.cat(rest_scores), torch.cat(rest_owner)
        top = torch.topk(all_s, min(budget, all_s.numel())).indices
        extra = torch.bincount(owner[top], minlength=len(units))
        counts = [c + int(e) for c, e in zip(counts, extra.tolist(), strict=True)]
    return counts


def _round_channel_counts(units: Sequence[PruningUnit], scores: Sequence[Tensor], counts: list[int],
                          mins: list[int], keep_total: int) -> list[int]:
    out = []
    for u, c, k0 in zip(units, counts, mins, strict=True):
        step = max(1, u.channel_multiple)
        out.append(c if c == u.num_groups else max(k0, (c // step) * step))
    sorted_s = [torch.sort(s.detach().float().cpu(), descending=True).values for s in scores]
    left = keep_total - sum(out)
    while left > 0:
        best, best_val = -1, -math.inf
        for i, u in enumerate(units):
            if out[i] >= u.num_groups:
                continue
            nxt = sorted_s[i][out[i] : out[i] + max(1, u.channel_multiple)]
            val = float(nxt.mean())
            if val > best_val:
                best, best_val = i, val
        if best < 0:
            break
        add = min(max(1, units[best].channel_multiple), units[best].num_groups - out[best])
        out[best] += add
        left -= add
    return out


def select_masks(units: Sequence[PruningUnit], scores: Sequence[Tensor], sparsity: float,
                 allocation: str = "uniform", min_keep: float = 0.05) -> list[Tensor]:
    """Hard {0,1} masks, one per unit, meeting the budget (see module docstring)."""
    if len(scores) != len(units):
        raise InvalidRequest(f"need one score tensor per unit: {len(scores)} scores for {len(units)} units")
    if not 0.0 <= sparsity < 1.0:
        raise InvalidRequest(f"sparsity must be in [0, 1), got {sparsity}")
    if allocation not in ("global", "uniform"):
        raise InvalidRequest(f"allocation must be 'global' or 'uniform', got {allocation!r}")
    for u, s in zip(units, scores, strict=True):
        assert s.numel() == u.num_groups, f"{u.name}: {s.numel()} scores for {u.num_groups} groups"
    masks: list[Tensor | None] = [None] * len(units)
    dense_idx = []
    for i, (u, s) in enumerate(zip(units, scores, strict=True)):
        if u.nm_m is not None:
            assert u.nm_n is not None
            masks[i] = nm_mask(s.detach(), u.nm_n, u.nm_m)
        else:
            dense_idx.append(i)
    if dense_idx:
        us = [units[i] for i in dense_idx]
        ss = [scores[i] for i in dense_idx]
        if allocation == "uniform":
            counts = uniform_counts(us, sparsity, min_keep)
        else:
            mins = [min_kept(u, min_keep) for u in us]
            total = round((1.0 - sparsity) * sum(u.num_groups for u in us))
            counts = _global_counts(us, ss, total, mins)
            if any(u.channel_multiple > 1 for u in us):
                counts = _round_channel_counts(us, ss, counts, mins, total)
        for i, u, s, k in zip(dense_idx, us, ss, counts, strict=True):
            assert 1 <= k <= u.num_groups, f"{u.name}: kept count {k} outside [1, {u.num_groups}]"
            masks[i] = _topk_mask(s.detach(), k)
    return [m for m in masks if m is not None]
