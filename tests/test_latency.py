"""measure_latency / measure_pair on real ONNX Runtime sessions with small models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pruning_core.latency import LatencyError, LatencyStats, measure_latency, measure_many, measure_pair


def _conv_model(path: Path, width: int) -> Path:
    """Two 3x3 convs on 32x32: MACs grow with width^2, so width 64 vs 16 is ~14x the work."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)).eval()
    axes = {0: "b", 2: "h", 3: "w"}  # spatial axes too: one file serves the lower-resolution test
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": axes, "y": axes})
    return path


def test_stats_are_consistent(tmp_path: Path) -> None:
    p = _conv_model(tmp_path / "m.onnx", 8)
    s = measure_latency(p, [1, 3, 32, 32], threads=1, warmup=3, min_runs=15, max_runs=200, max_seconds=5)
    assert isinstance(s, LatencyStats)
    assert s.provider == "CPUExecutionProvider" and s.threads == 1
    assert 15 <= s.runs <= 200
    assert 0 < s.median <= s.p90
    d = s.to_dict()
    assert set(d) == {"median", "p90", "mean", "runs", "provider", "threads", "cpu_median"}
    # one thread: the work runs on the calling thread, so CPU time is positive and (up to the clock's
    # granularity) never more than wall time; 1 ms covers the process-clock tick on coarse kernels
    assert s.cpu_median is not None and 0 < s.cpu_median <= s.median + 1.0


def test_run_limit_is_respected(tmp_path: Path) -> None:
    p = _conv_model(tmp_path / "m.onnx", 8)
    # rel_tol=0 can never be met: the loop must stop exactly at max_runs
    s = measure_latency(p, [2, 3, 32, 32], threads=1, warmup=1, min_runs=5, max_runs=23, rel_tol=0.0)
    assert s.runs == 23


def test_pair_sees_the_larger_model_as_slower(tmp_path: Path) -> None:
    dense = _conv_model(tmp_path / "dense.onnx", 64)
    small = _conv_model(tmp_path / "small.onnx", 16)
    d, p = measure_pair(dense, small, [1, 3, 32, 32], [1, 3, 32, 32], threads=1, warmup=3,
                        min_runs=15, max_runs=300, max_seconds=10)
    assert d.threads == p.threads == 1 and d.provider == p.provider
    assert d.runs == p.runs, "interleaved rounds give both models the same number of runs"
    # ~14x the MACs; even on a busy shared machine the dense model must be clearly slower (2x margin)
    assert d.median > 2 * p.median


def test_pair_takes_a_different_pruned_shape(tmp_path: Path) -> None:
    """3D pruning lowers the resolution: the pruned model is timed at its own input shape."""
    p = _conv_model(tmp_path / "m.onnx", 16)
    d, s = measure_pair(p, p, [1, 3, 32, 32], [1, 3, 16, 16], threads=1, warmup=2, min_runs=9,
                        max_runs=60, max_seconds=5)
    assert d.median > s.median


def test_many_models_interleaved_in_order(tmp_path: Path) -> None:
    paths = [_conv_model(tmp_path / f"w{w}.onnx", w) for w in (8, 32, 64)]
    stats = measure_many(paths, [[1, 3, 32, 32]] * 3, threads=1, warmup=2, min_runs=9, max_runs=90,
                         max_seconds=8)
    assert len({s.runs for s in stats}) == 1, "every model gets the same number of interleaved runs"
    # widths 8 / 32 / 64: ~0.8 / 10 / 39 MMACs; a >= 4x MAC step is far beyond timing noise
    assert stats[0].median < stats[1].median < stats[2].median


def test_bad_shape_and_provider_are_user_errors(tmp_path: Path) -> None:
    p = _conv_model(tmp_path / "m.onnx", 8)
    with pytest.raises(LatencyError, match="input shape"):
        measure_latency(p, [1, 5, 32, 32], threads=1, min_runs=3, max_runs=3)
    with pytest.raises(LatencyError, match="not available"):
        measure_latency(p, [1, 3, 32, 32], provider="NoSuchExecutionProvider")
