"""Latency on ONNX Runtime: warm-up, then runs until the median is stable, same settings for every model.

Measurement rules (what makes a dense-vs-pruned comparison fair):
- one session configuration for both: fixed intra-op threads, one inter-op thread, sequential execution,
  all graph optimisations on; the best execution provider present (TensorRT > CUDA > CPU) unless given;
- warm-up runs are discarded (allocator growth, kernel selection, caches);
- stop when the median of the latest half of the runs moved < `rel_tol` since the previous check
  (after `min_runs`), or when `max_runs` / `max_seconds` is reached;
- `measure_pair` interleaves dense and pruned rounds so machine drift (other processes, thermal)
  lands on both equally.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pruning_core.errors import HwpruneError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
REL_TOL = 0.01  # median stability criterion between checks (1%)

_NP_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


class LatencyError(HwpruneError):
    """The model cannot be timed as asked (wrong input shape, missing provider...)."""


@dataclass
class LatencyStats:
    median: float  # ms per run
    p90: float  # ms
    mean: float  # ms
    runs: int  # timed runs after warm-up
    provider: str  # execution provider that ran the model
    threads: int  # ORT intra-op threads
    # median process CPU time per run (ms): on a shared machine wall time includes other processes' time
    # slices, CPU time does not; with threads=1 it is the work itself (kernels run on the calling thread)
    cpu_median: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("median", "p90", "mean", "cpu_median"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 4)
        return d


def default_threads() -> int:
    """CPUs this process may use: a fixed number, so dense and pruned (and reruns) see the same count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_provider(provider: str | None = None) -> str:
    available = ort.get_available_providers()
    if provider is not None:
        if provider not in available:
            raise LatencyError(f"execution provider {provider!r} is not available here; available: {available}")
        return provider
    return next(p for p in PREFERRED_PROVIDERS if p in available)


def session_options(threads: int) -> ort.SessionOptions:
    """The settings every latency number is measured with: fixed intra-op threads, sequential, all optimisations."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def make_session(onnx_path: Path, threads: int, provider: str) -> ort.InferenceSession:
    so = session_options(threads)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=providers)
    except Exception as e:  # ORT raises its own exception types for bad files
        raise LatencyError(f"ONNX Runtime cannot load {Path(onnx_path).name}: {e}") from e


class _Timer:
    """One session plus its bound input; `run(n)` appends n timings (ms)."""

    def __init__(self, onnx_path: Path, input_shape: list[int], threads: int, provider: str, seed: int) -> None:
        self.sess = make_session(onnx_path, threads, provider)
        inputs = self.sess.get_inputs()
        if len(inputs) != 1:
            raise LatencyError(f"latency needs a single-input model, {Path(onnx_path).name} has {len(inputs)}")
        dtype = _NP_DTYPES.get(inputs[0].type)
        if dtype is None:
            raise LatencyError(f"unsupported input type {inputs[0].type} for latency measurement")
        rng = np.random.default_rng(seed)
        self.feed: dict[str, np.ndarray] = {inputs[0].name: rng.standard_normal(input_shape).astype(dtype)}
        self.provider = self.sess.get_providers()[0]
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        try:
            self.sess.run(None, self.feed)
        except Exception as e:
            raise LatencyError(f"{Path(onnx_path).name} does not run with input shape {input_shape}: {e}") from e

    def run(self, n: int, keep: bool = True) -> None:
        for _ in range(n):
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            self.sess.run(None, self.feed)
            t1, c1 = time.perf_counter_ns(), time.process_time_ns()
            if keep:
                self.times.append((t1 - t0) / 1e6)
                self.cpu_times.append((c1 - c0) / 1e6)

    def stats(self, threads: int) -> LatencyStats:
        t = np.asarray(self.times)
        return LatencyStats(
            median=float(np.median(t)), p90=float(np.percentile(t, 90)), mean=float(t.mean()),
            runs=len(t), provider=self.provider, threads=threads, cpu_median=float(np.median(self.cpu_times)),
        )


def _tail_median(times: list[float]) -> float:
    return float(np.median(times[len(times) // 2:]))


def _measure(
    paths: list[Path], shapes: list[list[int]], threads: int | None, warmup: int, min_runs: int,
    max_runs: int, max_seconds: float, provider: str | None, rel_tol: float, seed: int,
) -> list[LatencyStats]:
    assert min_runs >= 1 and max_runs >= min_runs, f"need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}"
    threads = threads or default_threads()
    prov = pick_provider(provider)
    timers = [_Timer(p, s, threads, prov, seed) for p, s in zip(paths, shapes, strict=True)]
    for t in timers:
        t.run(warmup, keep=False)
    start = time.perf_counter()
    previous: list[float | None] = [None] * len(timers)
    chunk = max(1, min(10, min_runs // 3))
    round_ = 0
    while True:
        # alternate the order each round so neither model always runs right after the other's cache misses
        order = timers if round_ % 2 == 0 else timers[::-1]
        step = min(chunk, max_runs - len(timers[0].times))
        for t in order:
            t.run(step)
        round_ += 1
        n = len(timers[0].times)
        if n >= max_runs or time.perf_counter() - start >= max_seconds:
            break
        if n < min_runs:
            continue
        meds = [_tail_median(t.times) for t in timers]
        stable = all(
            p is not None and abs(m - p) < rel_tol * m for m, p in zip(meds, previous, strict=True)
        )
        previous = list(meds)
        if stable:
            break
        chunk = max(chunk, n // 10)  # checks every ~10% more runs: a slow drift is not mistaken for stability
    return [t.stats(threads) for t in timers]


def measure_latency(
    onnx_path: Path, input_shape: list[int], *, threads: int | None = None, warmup: int = 10,
    min_runs: int = 30, max_runs: int = 2000, max_seconds: float = 20.0, provider: str | None = None,
    rel_tol: float = REL_TOL, seed: int = 0,
) -> LatencyStats:
    """Median/p90/mean latency (ms) of one model on ONNX Runtime; see module docstring for the rules."""
    return _measure(
        [Path(onnx_path)], [list(input_shape)], threads, warmup, min_runs, max_runs, max_seconds,
        provider, rel_tol, seed,
    )[0]


def measure_many(
    paths: list[Path], shapes: list[list[int]], *, threads: int | None = None, warmup: int = 10,
    min_runs: int = 30, max_runs: int = 2000, max_seconds: float = 60.0, provider: str | None = None,
    rel_tol: float = REL_TOL, seed: int = 0,
) -> list[LatencyStats]:
    """Several models under identical settings, interleaved round by round (sweeps, ablations)."""
    return _measure([Path(p) for p in paths], [list(s) for s in shapes], threads, warmup, min_runs, max_runs,
                    max_seconds, provider, rel_tol, seed)


def measure_pair(
    dense: Path, pruned: Path, dense_shape: list[int], pruned_shape: list[int], *, threads: int | None = None,
    warmup: int = 10, min_runs: int = 30, max_runs: int = 2000, max_seconds: float = 40.0,
    provider: str | None = None, rel_tol: float = REL_TOL, seed: int = 0,
) -> tuple[LatencyStats, LatencyStats]:
    """Dense and pruned latency under identical settings, measured in interleaved rounds.

    `pruned_shape` may differ from `dense_shape` (3D pruning lowers the resolution).
    `max_seconds` bounds the whole pair.
    """
    d, p = _measure(
        [Path(dense), Path(pruned)], [list(dense_shape), list(pruned_shape)], threads, warmup, min_runs,
        max_runs, max_seconds, provider, rel_tol, seed,
    )
    return d, p
