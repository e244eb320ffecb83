"""The task code: what a Celery task (worker/tasks.py) and the embedded worker (worker/embedded.py) both run.

`run_prune` (gpu queue) claims a queued job, runs `pipeline.prune_stage`, then hands the job to the cpu
queue; `run_measure` (cpu queue) runs `pipeline.measure_stage` on the machine type whose latency it reports
and copies the headline metrics from report.json onto the row. Every failure ends the job with a reason:
`HwpruneError` -> its message (the user can act on it), anything else -> a generic reason, traceback logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as rows
from db.artifacts import ArtifactStore
from db.session import transaction
from hwprune.settings import Settings
from lifecycle.sweeper import Heartbeat
from lifecycle.webhooks import notify_if_undelivered, notify_terminal
from pruning_core.errors import Cancelled, HwpruneError
from pruning_core.progress import Progress

log = logging.getLogger("hwprune.worker")
# Overall progress: pruning (gpu queue) is most of the work, latency measurement (cpu queue) the rest.
PRUNE_SPAN, MEASURE_SPAN = (0.0, 0.85), (0.85, 1.0)
INTERNAL = "internal error in the worker (the traceback is in the worker log); submit the job again or report it"
OUT_OF_MEMORY = ("the job ran out of memory on the worker; lower batch_size or input_shape, or use a smaller model "
                 "or a worker with more memory")
# How allocation failures read: numpy/Python MemoryError, torch's CPU allocator and CUDA OOM, onnxruntime's arena.
_OOM_MARKS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
              "bad_alloc", "bad allocation")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(m in str(e).lower() for m in _OOM_MARKS)


@dataclass
class TaskContext:
    factory: sessionmaker[Session]
    store: ArtifactStore
    settings: Settings
    enqueue_measure: Callable[[str], None]  # Celery: send to the cpu queue; embedded: local queue
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # after fork
    time_limit_s: float | None = None  # embedded only: Celery enforces its own soft/hard limits


def worker_gone(worker: str) -> bool:
    """True only when `worker` ("host:pid") ran on this host and that process no longer exists: the case of
    a pool process killed mid-job (OOM, segfault) whose message Celery requeues. Other hosts: unknown, False."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Progress metrics may hold numpy / torch scalars; the row stores JSON. Non-finite floats become null."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, bool | int | str) or v is None:
            return v
        try:
            f = float(v)
        except (TypeError, ValueError):
            return str(v)
        return f if math.isfinite(f) else None
    out = conv(metrics)
    json.dumps(out)
    return out


class RowProgress:
    """Adapts the pipeline's Progress callbacks to the job row: writes at most every `interval` seconds
    (plus on every stage change), and re-reads the cancel flag at most every `cancel_interval` seconds."""

    def __init__(self, ctx: TaskContext, job_id: str, started: float, span: tuple[float, float]) -> None:
        self.ctx, self.job_id, self.started = ctx, job_id, started
        self.lo, self.hi = span  # this stage's share of the job's overall 0..1
        self._last_write = -math.inf
        self._last_stage: str | None = None
        self._last_check = -math.inf
        self._cancelled = False
        self.timed_out = False
        self.writes = 0

    def report(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_write < self.ctx.settings.progress_interval_s:
            return
        with transaction(self.ctx.factory) as s:
            overall = self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0)
            rows.record_progress(s, self.job_id, stage, overall, _jsonable(metrics))
        self._last_write, self._last_stage = now, stage
        self.writes += 1

    def cancelled(self) -> bool:
        now = time.monotonic()
        limit = self.ctx.time_limit_s
        if limit is not None and now - self.started > limit:
            self.timed_out = True
            return True
        if not self._cancelled and now - self._last_check >= self.ctx.settings.cancel_poll_interval_s:
            self._last_check = now
            with self.ctx.factory() as s:
                self._cancelled = rows.cancel_requested(s, self.job_id)
        return self._cancelled

    def as_progress(self) -> Progress:
        return Progress(report=self.report, cancelled=self.cancelled)


def _end(ctx: TaskContext, job_id: str, status: str, error: str | None = None,
         metrics: dict[str, Any] | None = None) -> None:
    with transaction(ctx.factory) as s:
        ended = rows.finish(s, job_id, status, error=error, metrics=metrics)
    log.info("job %s %s%s", job_id, status, f": {error}" if error else "")
    if ended:  # the row is final: a webhook problem cannot change it (delivery runs in its own thread)
        notify_terminal(ctx.factory, ctx.settings, job_id)


def _run_guarded(ctx: TaskContext, job_id: str, tracker: RowProgress, body: Callable[[], None],
                 limit_s: int) -> bool:
    """Run `body`; on any failure end the job with a reason. True when body completed."""
    try:
        with Heartbeat(ctx.factory, job_id, ctx.worker_name, ctx.settings.heartbeat_interval_s):
            body()  # the heartbeat tells lifecycle/sweeper.py this job's worker is alive
        return True
    except Cancelled:
        if tracker.timed_out:
            _end(ctx, job_id, "failed", f"the job exceeded its time limit of {limit_s} s; lower steps or use a "
                                        "smaller model")
        else:
            _end(ctx, job_id, "cancelled", "cancelled by its owner")
    except SoftTimeLimitExceeded:
        _end(ctx, job_id, "failed", f"the job exceeded its time limit of {limit_s} s; lower steps or use a "
                                    "smaller model")
    except HwpruneError as e:  # a pipeline step may wrap an allocation failure (e.g. ORT "Cannot allocate memory")
        _end(ctx, job_id, "failed", OUT_OF_MEMORY if out_of_memory(e) else str(e))
    except Exception as e:
        if out_of_memory(e):
            log.warning("job %s ran out of memory: %s", job_id, e)
            _end(ctx, job_id, "failed", OUT_OF_MEMORY)
        else:
            log.exception("job %s crashed", job_id)
            _end(ctx, job_id, "failed", INTERNAL)
    return False


def run_prune(ctx: TaskContext, job_id: str) -> None:
    with transaction(ctx.factory) as s:
        job = rows.claim_prune(s, job_id, ctx.worker_name, worker_gone, ctx.settings.max_attempts)
        if job is not None:
            tenant_id, model_id, dataset_id, spec_d = job.tenant_id, job.model_id, job.dataset_id, dict(job.spec)
            fmt = _model_format(s, model_id)
    if job is None:  # committed: the claim itself may have ended it (cancelled before start, out of attempts)
        log.info("job %s: not queued any more (redelivered, cancelled or gone); skipping", job_id)
        notify_if_undelivered(ctx.factory, ctx.settings, job_id)
        return
    started = time.monotonic()
    tracker = RowProgress(ctx, job_id, started, PRUNE_SPAN)
    work_dir = ctx.store.job_dir(tenant_id, job_id)

    def body() -> None:
        from pruning_core.pipeline import prune_stage  # torch & co: imported once per worker process
        from pruning_core.spec import PruneSpec

        spec = PruneSpec.from_dict(spec_d)
        work_dir.mkdir(parents=True, exist_ok=True)
        data_path = ctx.store.dataset_path(tenant_id, dataset_id) if dataset_id else None
        progress = tracker.as_progress()
        prune_stage(spec, ctx.store.model_path(tenant_id, model_id, fmt), work_dir, data_path, progress)
        progress.check_cancel()

    if not _run_guarded(ctx, job_id, tracker, body, ctx.settings.job_soft_time_limit_s):
        return
    with transaction(ctx.factory) as s:
        handed = rows.hand_to_measure(s, job_id)
    if not handed:
        log.warning("job %s changed state while pruning; not measuring", job_id)
        return
    try:
        ctx.enqueue_measure(job_id)
    except Exception as e:
        log.exception("could not enqueue measurement for job %s", job_id)
        _end(ctx, job_id, "failed", f"could not queue the latency measurement: {e}")
    log.info("job %s pruned in %.1f s (%d progress writes); queued for measurement", job_id,
             time.monotonic() - started, tracker.writes)


def _model_format(s: Session, model_id: str) -> str:
    from db.models import ModelRecord

    model = s.get(ModelRecord, model_id)
    assert model is not None, f"job references missing model {model_id}"
    return model.format


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers copied onto the row so lists can show them without opening report.json."""
    lat = report.get("latency_ms") or {}
    out: dict[str, Any] = {
        "speedup": report.get("speedup"),
        "achieved_sparsity": report.get("achieved_sparsity"),
        "target_sparsity": report.get("target_sparsity"),
        "latency_ms": {k: (v or {}).get("median") for k, v in lat.items() if k in ("dense", "pruned")},
        "fidelity": report.get("fidelity"),
        "macs": report.get("macs"),
        "params": report.get("params"),
    }
    if report.get("accuracy") is not None:
        out["accuracy"] = report["accuracy"]
    return _jsonable(out)


def run_measure(ctx: TaskContext, job_id: str) -> None:
    with transaction(ctx.factory) as s:
        job = rows.claim_measure(s, job_id, ctx.worker_name, worker_gone, ctx.settings.max_attempts)
        if job is not None:
            tenant_id = job.tenant_id
            cancel_first = job.cancel_requested
    if job is None:  # committed: the claim itself may have ended it (out of attempts)
        log.info("job %s: not waiting for measurement (redelivered or cancelled); skipping", job_id)
        notify_if_undelivered(ctx.factory, ctx.settings, job_id)
        return
    if cancel_first:
        _end(ctx, job_id, "cancelled", "cancelled by its owner")
        return
    tracker = RowProgress(ctx, job_id, time.monotonic(), MEASURE_SPAN)
    result: dict[str, Any] = {}

    def body() -> None:
        from pruning_core.pipeline import measure_stage

        result.update(measure_stage(ctx.store.job_dir(tenant_id, job_id), tracker.as_progress()))

    if _run_guarded(ctx, job_id, tracker, body, ctx.settings.measure_time_limit_s):
        _end(ctx, job_id, "succeeded", metrics=summarize(result))
