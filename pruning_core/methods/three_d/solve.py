"""Budgeted maximisation: the best (d, w, r) whose REAL MACs fit the budget.

Wang et al., ICML 2021 (arXiv 2010.04879) maximise F(d, w, r) subject to d * w^2 * r^2 = T. Real models do not
follow that cost model (stem and head scale with w, not w^2; channel counts round to the accelerator's multiple;
blocks differ in cost), so we enumerate the rounded candidates the model can actually take (whole blocks,
channel-multiple widths, accepted input sizes), rank them by predicted F, and walk down the ranking measuring
the real MACs of each built candidate until one fits. A cheap MACs estimate only skips candidates that are
clearly over budget; the decision always rests on the measured count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pruning_core.errors import InvalidRequest


@dataclass(frozen=True)
class Candidate:
    """One rounded point: remove the first `blocks_removed` blocks, keep `keep` channels, run at `size`."""

    blocks_removed: int
    keep: float  # kept channel fraction asked of the channel plan (uniform allocation)
    size: tuple[int, ...]  # input spatial size
    d: float  # achieved kept fractions, the model's coordinates
    w: float
    r: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size)
        return out


@dataclass
class SolveResult:
    best: Candidate
    macs: int  # measured MACs of `best`
    predicted: float
    evaluated: list[dict[str, Any]]  # every candidate whose real MACs were measured, in order
    candidates: int  # size of the search space


def solve_budget(candidates: Sequence[Candidate], predict: Callable[[Candidate], float],
                 estimate_macs: Callable[[Candidate], float], real_macs: Callable[[Candidate], int],
                 budget: float, slack: float = 1.25, max_evals: int = 40, floor: float = 0.0) -> SolveResult:
    """argmax predict(c) subject to floor * budget <= real_macs(c) <= budget.

    `floor` turns the paper's equality constraint C = T * C(1, 1, 1) into a band: a fitted F need not be
    monotone, and without a floor it may pick a far smaller model than the user paid for.

    Walks candidates in order of decreasing prediction, skipping those whose estimate is outside the band
    widened by `slack` (the estimate may be off by the stem/head/rounding effects), and returns the first
    whose measured MACs fit. If `max_evals` measurements find none, the floor is dropped (same walk), and
    then the cheapest-estimated candidates are measured so a feasible answer is found whenever one exists.
    """
    assert candidates, "no candidates to choose from"
    assert budget > 0, f"budget must be positive, got {budget}"
    cache: dict[Candidate, int] = {}
    evaluated: list[dict[str, Any]] = []

    def measure(c: Candidate) -> int:
        if c not in cache:
            cache[c] = int(real_macs(c))
            evaluated.append({**c.to_dict(), "macs": cache[c], "predicted": float(predict(c)),
                              "fits": lo <= cache[c] <= budget})
        return cache[c]

    lo = floor * budget

    by_pred = sorted(candidates, key=lambda c: (-predict(c), estimate_macs(c)))
    # Pass 1: best prediction inside the band [floor * budget, budget].
    for c in by_pred:
        if len(cache) >= max_evals:
            break
        est = estimate_macs(c)
        if est > slack * budget or est < lo / slack:
            continue
        if lo <= measure(c) <= budget:
            return SolveResult(c, cache[c], float(predict(c)), evaluated, len(candidates))
    # Pass 2 (the band is empty or out of reach, e.g. coarse single-axis steps): drop the floor.
    for c in by_pred:
        if c in cache and cache[c] <= budget:
            return SolveResult(c, cache[c], float(predict(c)), evaluated, len(candidates))
        if len(cache) >= 2 * max_evals:
            break
        if c not in cache and estimate_macs(c) <= slack * budget and measure(c) <= budget:
            return SolveResult(c, cache[c], float(predict(c)), evaluated, len(candidates))
    # Pass 3: cheapest first, so a feasible answer is found whenever one exists; best prediction among them.
    feasible = [c for c, m in cache.items() if m <= budget]
    for c in sorted(candidates, key=estimate_macs):
        if len(cache) >= 3 * max_evals or len(feasible) >= 3:
            break
        if c not in cache and measure(c) <= budget:
            feasible.append(c)
    if not feasible:
        smallest = min(cache.values())
        raise InvalidRequest(
            f"flops_target is too low for this model: the smallest candidate we can build keeps {smallest} MACs "
            f"but the budget is {int(budget)}; raise flops_target"
        )
    best = max(feasible, key=predict)
    return SolveResult(best, cache[best], float(predict(best)), evaluated, len(candidates))
