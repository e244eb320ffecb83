"""The low-rank polynomial accuracy model: least squares recovers known polynomials."""

from __future__ import annotations

import numpy as np

from pruning_core.methods.three_d.poly import LowRankPoly, fit_error, fit_low_rank

P, Q, U = np.array([0.2, 0.9, -0.3]), np.array([0.1, 1.2, -0.4]), np.array([0.5, 0.3, 0.1])
P2, Q2, U2 = np.array([0.5, -0.2, 0.4]), np.array([0.3, 0.1, 0.2]), np.array([-0.2, 0.6, 0.1])
RANK1 = LowRankPoly(2, 1, np.array([[P, Q, U]]))
RANK2 = LowRankPoly(2, 2, np.array([[P, Q, U], [P2, Q2, U2]]))


def axis_chains(levels: np.ndarray) -> np.ndarray:
    """The sampling design of run_3d: the dense point plus one chain per axis (other axes at 1)."""
    pts = [[1.0, 1.0, 1.0]]
    for a in range(3):
        for v in levels:
            p = [1.0, 1.0, 1.0]
            p[a] = float(v)
            pts.append(p)
    return np.array(pts)


def test_rank1_is_recovered_from_axis_chains_alone() -> None:
    x = axis_chains(np.array([0.3, 0.475, 0.65, 0.825]))
    fit = fit_low_rank(x, RANK1.predict(x), degree=2, rank=1)
    held = np.random.default_rng(0).uniform(0.3, 1.0, (50, 3))  # combined points never sampled
    err = fit_error(fit, held, RANK1.predict(held))
    # Exact data and an identifiable model: only ALS convergence error remains (its stop rule is 1e-13 relative).
    assert err["points"] == 50 and err["max_abs"] < 1e-5, err


def test_rank2_is_recovered_from_combined_points() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 1.0, (60, 3))
    fit = fit_low_rank(x, RANK2.predict(x), degree=2, rank=2, restarts=2)
    held = rng.uniform(0.2, 1.0, (50, 3))
    # ALS on rank 2 converges slowly (a known "swamp" of CP fits); 1e-3 is 0.1% of the function's range (~1).
    assert fit_error(fit, held, RANK2.predict(held))["max_abs"] < 1e-3


def test_noisy_samples_give_a_least_squares_fit_not_an_interpolation() -> None:
    x = axis_chains(np.linspace(0.2, 0.9, 6))
    noise = np.random.default_rng(2).normal(0, 0.01, len(x))
    fit = fit_low_rank(x, RANK1.predict(x) + noise, degree=2, rank=1)
    train = fit_error(fit, x, RANK1.predict(x) + noise)
    # 16 points, 7 free parameters: residuals stay (not interpolated) but of the noise's size (sigma 0.01).
    assert 1e-4 < train["rmse"] < 0.02
    held = np.random.default_rng(3).uniform(0.3, 1.0, (50, 3))
    assert fit_error(fit, held, RANK1.predict(held))["max_abs"] < 0.06


def test_coefficients_are_reported_per_term() -> None:
    d = RANK2.to_dict()
    assert d["rank"] == 2 and d["degree"] == 2 and d["terms"][1]["u"] == U2.tolist()
    assert abs(RANK2(1.0, 1.0, 1.0) - (P.sum() * Q.sum() * U.sum() + P2.sum() * Q2.sum() * U2.sum())) < 1e-12
