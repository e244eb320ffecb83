"""The job state machine (Onyx-style job rows): queued -> running -> succeeded | failed | cancelled.

Every transition reads the row with `SELECT ... FOR UPDATE` and re-checks the state it expects inside the
same transaction, so a message Celery delivers twice (acks_late + redelivery) finds the job already taken and
does nothing. On SQLite (embedded default) FOR UPDATE is a no-op; there the single writer lock plus the
status-guarded UPDATE give the same guarantee.

A running job has a `phase`: `prune` (gpu queue) -> `measure_queued` -> `measure` (cpu queue) -> `done`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import TERMINAL_STATUSES, Job, utcnow

WORKER_DIED = ("its worker process died during each of {n} attempts (killed; most often by the out-of-memory "
               "killer); lower batch_size or input_shape, or use a smaller model or a worker with more memory")


class TransitionRefused(Exception):
    """The job is not in a state that allows this transition (e.g. cancelling a finished job)."""


def _locked(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id).with_for_update())


def _guarded_update(session: Session, job_id: str, expect: dict[str, Any], values: dict[str, Any]) -> bool:
    """UPDATE ... WHERE id = :id AND <expected state>; True when exactly this row changed."""
    stmt = update(Job).where(Job.id == job_id)
    for col, val in expect.items():
        stmt = stmt.where(getattr(Job, col) == val)
    res = session.execute(stmt.values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def _take_over(session: Session, job: Job, phase: str, worker: str, worker_gone: Callable[[str], bool] | None,
               max_attempts: int | None = None) -> Job | None:
    """A redelivered message for a job whose worker process is known to be dead (Celery requeues on a lost
    worker) takes it over; a live or unknown holder keeps it, so a job never runs twice at once. After
    `max_attempts` runs the job fails instead: a job that kills its worker (OOM killer) must not loop forever."""
    if worker_gone is None or job.status != "running" or job.phase != phase or not job.worker:
        return None
    if not worker_gone(job.worker):
        return None
    if max_attempts is not None and job.attempts >= max_attempts:
        _guarded_update(session, job.id, {"status": "running", "phase": phase, "worker": job.worker},
                        {"status": "failed", "finished_at": utcnow(), "error": WORKER_DIED.format(n=job.attempts)})
        return None
    ok = _guarded_update(session, job.id, {"status": "running", "phase": phase, "worker": job.worker},
                         {"worker": worker, "attempts": job.attempts + 1, "stage": "restarting",
                          "heartbeat_at": utcnow()})
    if not ok:
        return None
    session.refresh(job)
    return job


def claim_prune(session: Session, job_id: str, worker: str,
                worker_gone: Callable[[str], bool] | None = None, max_attempts: int | None = None) -> Job | None:
    """queued -> running (phase prune). None when the job is gone, already taken, or was cancelled.
    With `worker_gone`, a job still marked running by a dead worker process is taken over."""
    job = _locked(session, job_id)
    if job is None:
        return None
    if job.status == "running":
        return _take_over(session, job, "prune", worker, worker_gone, max_attempts)
    if job.status != "queued":
        return None
    if job.cancel_requested:
        _guarded_update(session, job_id, {"status": "queued"},
                        {"status": "cancelled", "finished_at": utcnow(), "error": "cancelled before it started"})
        return None
    ok = _guarded_update(
        session, job_id, {"status": "queued"},
        {"status": "running", "phase": "prune", "worker": worker, "started_at": utcnow(),
         "attempts": job.attempts + 1, "stage": "starting", "heartbeat_at": utcnow()},
    )
    if not ok:
        return None
    session.refresh(job)
    return job


def hand_to_measure(session: Session, job_id: str) -> bool:
    """phase prune -> measure_queued, before the measure task is sent."""
    return _guarded_update(session, job_id, {"status": "running", "phase": "prune"}, {"phase": "measure_queued"})


def claim_measure(session: Session, job_id: str, worker: str,
                  worker_gone: Callable[[str], bool] | None = None, max_attempts: int | None = None
                  ) -> Job | None:
    """phase measure_queued -> measure. None when already taken or no longer running."""
    job = _locked(session, job_id)
    if job is None or job.status != "running":
        return None
    if job.phase == "measure":
        return _take_over(session, job, "measure", worker, worker_gone, max_attempts)
    if job.phase != "measure_queued":
        return None
    if not _guarded_update(session, job_id, {"status": "running", "phase": "measure_queued"},
                           {"phase": "measure", "worker": worker, "heartbeat_at": utcnow()}):
        return None
    session.refresh(job)
    return job


def record_progress(session: Session, job_id: str, stage: str, progress: float, metrics: dict[str, Any]) -> bool:
    frac = min(max(float(progress), 0.0), 1.0)
    return _guarded_update(session, job_id, {"status": "running"},
                           {"stage": stage[:64], "progress": frac, "progress_metrics": metrics or None,
                            "heartbeat_at": utcnow()})


def beat(session: Session, job_id: str, worker: str) -> bool:
    """The running worker says it is alive (worker/runner.py Heartbeat); lifecycle/sweeper.py re-queues or fails
    running jobs whose heartbeat is stale. False when the job is no longer this worker's."""
    return _guarded_update(session, job_id, {"status": "running", "worker": worker}, {"heartbeat_at": utcnow()})


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish(
    session: Session, job_id: str, status: str, *, error: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """running -> terminal. A job that is no longer running (e.g. already finished) is left alone."""
    assert status in TERMINAL_STATUSES, f"finish() needs a terminal status, got {status!r}"
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if status == "succeeded":
        values.update(progress=1.0, phase="done", stage="done")
    if metrics is not None:
        values.update(metrics=metrics, speedup=metrics.get("speedup"),
                      achieved_sparsity=metrics.get("achieved_sparsity"))
    return _guarded_update(session, job_id, {"status": "running"}, values)


def request_cancel(session: Session, job: Job) -> Job:
    """Queued: cancelled at once (the task will find it taken). Running: set the flag the pipeline polls."""
    locked = _locked(session, job.id)
    assert locked is not None, "job vanished while cancelling"
    if locked.status in TERMINAL_STATUSES:
        raise TransitionRefused(f"job is already {locked.status}; only queued or running jobs can be cancelled")
    if locked.status == "queued":
        _guarded_update(session, job.id, {"status": "queued"},
                        {"status": "cancelled", "cancel_requested": True, "finished_at": utcnow(),
                         "error": "cancelled before it started"})
    else:
        _guarded_update(session, job.id, {"status": "running"}, {"cancel_requested": True})
    session.refresh(locked)
    return locked


# The task names and queues both the API (sender) and the worker (consumer) agree on.
PRUNE_TASK, PRUNE_QUEUE = "hwprune.prune", "gpu"
MEASURE_TASK, MEASURE_QUEUE = "hwprune.measure", "cpu"
