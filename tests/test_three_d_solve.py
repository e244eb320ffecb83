"""Budgeted solve: the chosen candidate's REAL MACs fit the budget and it is the best feasible one."""

from __future__ import annotations

import itertools

import pytest

from pruning_core.errors import InvalidRequest
from pruning_core.methods.three_d.solve import Candidate, solve_budget

CANDS = [Candidate(k, w, (s, s), 1 - k / 4, w, s / 32)
         for k, w, s in itertools.product(range(5), (0.25, 0.5, 0.75, 1.0), (16, 24, 32))]
DENSE = 1_000_000


def real(c: Candidate) -> int:
    """A cost the d*w^2*r^2 model gets wrong: a fixed stem/head (10%) and a width term linear for the stem."""
    return int(DENSE * (0.1 + 0.9 * (0.2 + 0.8 * c.d) * (0.3 * c.w + 0.7 * c.w**2) * c.r**2))


def naive(c: Candidate) -> float:
    return DENSE * c.d * c.w**2 * c.r**2  # the paper's cost model: underestimates `real` badly at small w, d


def score(c: Candidate) -> float:
    return c.d**0.3 + c.w**0.5 + 0.8 * c.r  # any function the model might predict


@pytest.mark.parametrize("target", [0.5, 0.25, 0.15])
def test_choice_is_the_best_candidate_whose_real_macs_fit(target: float) -> None:
    budget = target * DENSE
    res = solve_budget(CANDS, score, naive, real, budget, slack=1e9, max_evals=len(CANDS))
    feasible = [c for c in CANDS if real(c) <= budget]
    assert res.macs == real(res.best) <= budget
    assert score(res.best) == max(score(c) for c in feasible)
    # The naive cost model alone would have picked an infeasible point: the real check matters here.
    naive_pick = max((c for c in CANDS if naive(c) <= budget), key=score)
    assert real(naive_pick) > budget


def test_a_tight_estimate_filter_still_returns_a_feasible_point() -> None:
    # slack 1.0 with an underestimating cost model skips nothing feasible-looking; the budget still holds.
    res = solve_budget(CANDS, score, naive, real, 0.3 * DENSE, slack=1.0, max_evals=5)
    assert real(res.best) <= 0.3 * DENSE
    assert len(res.evaluated) <= 2 * 5 + 3


def test_an_impossible_budget_says_what_to_change() -> None:
    with pytest.raises(InvalidRequest, match="raise flops_target"):
        solve_budget(CANDS, score, naive, real, 0.01 * DENSE)


def test_the_floor_keeps_the_choice_near_the_budget_even_when_smaller_models_score_higher() -> None:
    def smaller_is_better(c: Candidate) -> float:
        return -c.d - c.w - c.r  # a pathological fitted F that prefers tiny models

    budget = 0.5 * DENSE
    free = solve_budget(CANDS, smaller_is_better, naive, real, budget, slack=1e9, max_evals=len(CANDS))
    banded = solve_budget(CANDS, smaller_is_better, naive, real, budget, slack=1e9, max_evals=len(CANDS),
                          floor=0.8)
    assert real(free.best) < 0.8 * budget  # without a floor the tiny model wins
    assert 0.8 * budget <= real(banded.best) <= budget
