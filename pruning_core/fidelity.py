"""Fidelity: how closely the pruned model reproduces the dense model's outputs on the same inputs.

Labels are optional in a job, so the report always measures agreement with the dense model (the
teacher) instead of accuracy: top-1 agreement (the prediction a user sees), cosine similarity and
relative L2 error of the raw outputs (how far the logits moved even when the argmax did not).
All three are computed per sample and averaged over samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EPS = 1e-12  # guards the division for an all-zero dense output (rel_l2 then measures the pruned norm)


def _as_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fidelity(dense_out: torch.Tensor | np.ndarray, pruned_out: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """`{"top1_agreement", "cosine", "rel_l2", "samples"}` for outputs shaped [samples, ...].

    top-1 is the argmax over the last axis (classes; for sequence outputs every position counts),
    and is None when that axis has a single element (regression: there is no class to agree on).
    """
    d, p = _as_array(dense_out), _as_array(pruned_out)
    if d.shape != p.shape:
        raise ValueError(f"dense and pruned outputs differ in shape: {d.shape} vs {p.shape}")
    assert d.ndim >= 1 and d.shape[0] > 0, f"need outputs shaped [samples, ...], got {d.shape}"
    n = d.shape[0]
    top1: float | None = None
    if d.ndim >= 2 and d.shape[-1] > 1:
        top1 = float((d.argmax(-1) == p.argmax(-1)).mean())
    df, pf = d.reshape(n, -1), p.reshape(n, -1)
    dn, pn = np.linalg.norm(df, axis=1), np.linalg.norm(pf, axis=1)
    cos = (df * pf).sum(1) / np.maximum(dn * pn, EPS)
    rel = np.linalg.norm(pf - df, axis=1) / np.maximum(dn, EPS)
    return {
        "top1_agreement": top1,
        "cosine": float(cos.mean()),
        "rel_l2": float(rel.mean()),
        "samples": int(n),
    }
