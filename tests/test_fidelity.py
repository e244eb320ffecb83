"""fidelity(): agreement of pruned with dense outputs, per sample, averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pruning_core.fidelity import fidelity


def test_identical_outputs_agree_fully() -> None:
    d = torch.randn(16, 10)
    f = fidelity(d, d.clone())
    assert f["top1_agreement"] == 1.0
    assert f["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert f["rel_l2"] == pytest.approx(0.0, abs=1e-12)
    assert f["samples"] == 16


def test_scaled_outputs_keep_direction_but_not_norm() -> None:
    d = np.random.default_rng(0).normal(size=(8, 5))
    f = fidelity(d, 0.5 * d)
    assert f["top1_agreement"] == 1.0
    assert f["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert f["rel_l2"] == pytest.approx(0.5, abs=1e-12)


def test_top1_counts_flipped_predictions_and_per_sample_mean() -> None:
    d = np.zeros((4, 3))
    d[:, 0] = 1.0  # every dense prediction is class 0
    p = d.copy()
    p[:2] = [0.0, 1.0, 0.0]  # first two samples now predict class 1 (orthogonal: cosine 0, rel_l2 sqrt 2)
    f = fidelity(d, p)
    assert f["top1_agreement"] == 0.5
    assert f["cosine"] == pytest.approx(0.5)
    assert f["rel_l2"] == pytest.approx(np.sqrt(2) / 2)


def test_sequence_outputs_and_regression() -> None:
    d = torch.randn(2, 6, 4)
    p = d.clone()
    p[0, 0] = -p[0, 0]  # one of 12 positions changes its argmax (unless ties, impossible with randn)
    assert fidelity(d, p)["top1_agreement"] == pytest.approx(11 / 12)
    assert fidelity(torch.randn(5, 1), torch.randn(5, 1))["top1_agreement"] is None


def test_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        fidelity(np.zeros((2, 3)), np.zeros((2, 4)))
