"""The accuracy model F(d, w, r): a low-rank polynomial fitted by least squares.

Wang et al., ICML 2021 (arXiv 2010.04879) model accuracy as a polynomial sum_{ijk} lambda_ijk d^i w^j r^k and
specialise the coefficient tensor to low rank so that few samples suffice:

    F(d, w, r) = sum_{l=1..R} p_l(d) * q_l(w) * u_l(r),   p_l, q_l, u_l of degree K.

With R = 1 the model is identifiable from one pruning chain per axis plus the unpruned point (each chain pins
one factor up to scale, the point (1, 1, 1) pins the scale); R >= 2 also needs combined samples. Fitting is
alternating least squares: with two factors fixed, F is linear in the third factor's coefficients (of all R
terms at once), so each half-step is an exact ridge-regularised least-squares solve. Several random restarts,
the best training error wins. ALS is slow in the "swamps" of rank >= 2 fits, so each restart ends with a
trust-region least-squares refinement (scipy `least_squares`) of all coefficients at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares


@dataclass
class LowRankPoly:
    degree: int  # K
    rank: int  # R
    coef: np.ndarray  # [R, 3, K+1]: coefficients (constant term first) of p_l, q_l, u_l

    def factors(self, x: np.ndarray) -> np.ndarray:
        """[N, R, 3] values of p_l(d), q_l(w), u_l(r) at x [N, 3]."""
        powers = x[:, :, None] ** np.arange(self.degree + 1)  # [N, 3, K+1]
        return np.einsum("nak,rak->nra", powers, self.coef)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        assert x.shape[1] == 3, f"points are (d, w, r) triples, got shape {x.shape}"
        return self.factors(x).prod(axis=2).sum(axis=1)

    def __call__(self, d: float, w: float, r: float) -> float:
        return float(self.predict(np.array([[d, w, r]]))[0])

    def to_dict(self) -> dict[str, Any]:
        """Coefficients per term as {"p": [c0, c1, ...], "q": [...], "u": [...]}, constant term first."""
        return {
            "form": "F(d,w,r) = sum_l p_l(d) * q_l(w) * u_l(r)",
            "degree": self.degree, "rank": self.rank,
            "terms": [{"p": c[0].tolist(), "q": c[1].tolist(), "u": c[2].tolist()} for c in self.coef],
        }


def _balance(coef: np.ndarray) -> np.ndarray:
    """Move each term's scale into p so q and u have unit norm (the product is unchanged; ALS stays stable)."""
    out = coef.copy()
    for r in range(out.shape[0]):
        for a in (1, 2):
            n = np.linalg.norm(out[r, a])
            if n > 1e-12:
                out[r, a] /= n
                out[r, 0] *= n
    return out


def _sse(model: LowRankPoly, x: np.ndarray, y: np.ndarray) -> float:
    return float(((model.predict(x) - y) ** 2).sum())


def fit_low_rank(x: np.ndarray, y: np.ndarray, degree: int = 2, rank: int = 1, ridge: float = 1e-8,
                 iters: int = 200, restarts: int = 8, seed: int = 0) -> LowRankPoly:
    """Least-squares fit of F to samples x [N, 3] (d, w, r) and y [N] by alternating least squares.

    `ridge` is a tiny Tikhonov term: it only picks one solution when a half-step is underdetermined
    (e.g. the q factor of a term never varies its w in the data); at 1e-8 it does not bias a determined fit.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    assert x.ndim == 2 and x.shape[1] == 3 and y.shape == (x.shape[0],), "x is [N, 3] (d, w, r), y is [N]"
    assert degree >= 0 and rank >= 1, f"need degree >= 0 and rank >= 1, got {degree}, {rank}"
    k1 = degree + 1
    powers = x[:, :, None] ** np.arange(k1)  # [N, 3, K+1]
    rng = np.random.default_rng(seed)
    best: LowRankPoly | None = None
    best_err = np.inf
    for attempt in range(restarts):
        coef = rng.normal(scale=0.3, size=(rank, 3, k1))
        coef[:, :, 0] += 1.0  # start near constant factors: the data's mean level is reachable at once
        if attempt == 0:
            coef[:, :, 1:] = 0.0
            coef[1:, :, 0] = 0.1  # rank > 1: break the symmetry between terms
        model = LowRankPoly(degree, rank, coef)
        prev = np.inf
        for _ in range(iters):
            for a in range(3):
                f = model.factors(x)  # [N, R, 3]
                others = np.prod(np.delete(f, a, axis=2), axis=2)  # [N, R]
                design = (others[:, :, None] * powers[:, a, None, :]).reshape(len(x), rank * k1)
                lhs = design.T @ design + ridge * np.eye(rank * k1)
                sol = np.linalg.solve(lhs, design.T @ y)
                model.coef[:, a, :] = sol.reshape(rank, k1)
            model.coef = _balance(model.coef)
            err = _sse(model, x, y)
            if np.isfinite(prev) and prev - err <= 1e-13 * max(1.0, prev):
                break
            prev = err
        model = _refine(model, x, y)
        err = _sse(model, x, y)
        if err < best_err:
            best, best_err = LowRankPoly(degree, rank, model.coef.copy()), err
    assert best is not None
    return best


def _refine(model: LowRankPoly, x: np.ndarray, y: np.ndarray) -> LowRankPoly:
    """Trust-region least squares on all coefficients, started from the ALS solution; never worse than it."""
    shape = model.coef.shape

    def residual(c: np.ndarray) -> np.ndarray:
        return LowRankPoly(model.degree, model.rank, c.reshape(shape)).predict(x) - y

    sol = least_squares(residual, model.coef.ravel(), method="trf", xtol=1e-15, ftol=1e-15, gtol=1e-15,
                        max_nfev=2000)
    refined = LowRankPoly(model.degree, model.rank, _balance(sol.x.reshape(shape)))
    return refined if _sse(refined, x, y) <= _sse(model, x, y) else model


def fit_error(model: LowRankPoly, x: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    """Root-mean-square and worst absolute error of the model on (held-out) points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(y) == 0:
        return {"points": 0, "rmse": float("nan"), "max_abs": float("nan")}
    e = model.predict(x) - y
    return {"points": len(y), "rmse": float(np.sqrt((e**2).mean())), "max_abs": float(np.abs(e).max())}
