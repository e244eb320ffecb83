"""The shared task code (worker/runner.py) and the embedded worker on SQLite: bounded progress writes, cancel
polling, failure reasons, metrics copied from the report, recovery after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as rows
from db.artifacts import ArtifactStore
from db.keys import create_key
from db.migrate import upgrade
from db.models import Job, ModelRecord
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from worker.embedded import EmbeddedWorker
from worker.runner import INTERNAL, RowProgress, TaskContext, run_measure, run_prune, summarize


@pytest.fixture()
def ctx(tmp_path: Path) -> TaskContext:
    settings = Settings(data_dir=tmp_path, progress_interval_s=0.2, cancel_poll_interval_s=0.2)
    upgrade(settings.resolved_database_url)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    return TaskContext(factory=factory, store=ArtifactStore(tmp_path), settings=settings,
                       enqueue_measure=lambda job_id: None)


def _job(factory: sessionmaker[Session], store: ArtifactStore, model_bytes: bytes | None = b"junk",
         status: str = "queued") -> tuple[str, str]:
    with transaction(factory) as s:
        tenant, _ = create_key(s, "runner")
        m = ModelRecord(tenant_id=tenant.id, name="m", format="onnx", opset=17, inputs=[], outputs=[], params=1,
                        macs=1, sha256="0" * 64, size_bytes=4)
        s.add(m)
        s.flush()
        j = Job(tenant_id=tenant.id, model_id=m.id, method="magnitude", granularity="channel", accelerator="cpu",
                spec={"method": "magnitude", "granularity": "channel", "steps": 1}, status=status, progress=0.0,
                cancel_requested=False, attempts=0)
        s.add(j)
        s.flush()
        ids = (j.id, tenant.id)
        path = store.model_path(tenant.id, m.id, "onnx")
    if model_bytes is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model_bytes)
    return ids


def _get(ctx: TaskContext, job_id: str) -> Job:
    with ctx.factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_progress_writes_are_rate_limited(ctx: TaskContext) -> None:
    job_id, _ = _job(ctx.factory, ctx.store)
    with transaction(ctx.factory) as s:
        rows.claim_prune(s, job_id, "w")
    tracker = RowProgress(ctx, job_id, time.monotonic(), (0.0, 0.85))
    t0 = time.monotonic()
    calls = 0
    while time.monotonic() - t0 < 0.5:
        tracker.report("prune", min(1.0, (time.monotonic() - t0) / 0.5), {"step": calls})
        calls += 1
    tracker.report("export", 1.0, {})
    # 0.5 s at one write per 0.2 s -> at most 3 writes for "prune" (+1 for the stage change), out of many calls.
    assert calls > 100 and 2 <= tracker.writes <= 4, (calls, tracker.writes)
    job = _get(ctx, job_id)
    assert job.stage == "export" and job.progress == pytest.approx(0.85), "stage fraction maps onto 0..0.85"


def test_cancel_flag_is_read_at_a_bounded_rate(ctx: TaskContext) -> None:
    job_id, _ = _job(ctx.factory, ctx.store)
    with transaction(ctx.factory) as s:
        rows.claim_prune(s, job_id, "w")
    tracker = RowProgress(ctx, job_id, time.monotonic(), (0.0, 1.0))
    assert not tracker.cancelled()
    with transaction(ctx.factory) as s:
        rows.request_cancel(s, _get(ctx, job_id))
    assert not tracker.cancelled(), "re-read only after cancel_poll_interval_s"
    time.sleep(0.25)
    assert tracker.cancelled()


def test_time_limit_ends_the_job_as_failed_with_a_reason(ctx: TaskContext) -> None:
    ctx.time_limit_s = 0.0
    job_id, _ = _job(ctx.factory, ctx.store)
    with transaction(ctx.factory) as s:
        rows.claim_prune(s, job_id, "w")
    tracker = RowProgress(ctx, job_id, time.monotonic() - 1, (0.0, 1.0))
    assert tracker.cancelled() and tracker.timed_out


def test_rejected_model_fails_with_the_users_reason(ctx: TaskContext) -> None:
    job_id, _ = _job(ctx.factory, ctx.store, model_bytes=b"this is not a model")
    run_prune(ctx, job_id)
    job = _get(ctx, job_id)
    assert job.status == "failed" and job.error and job.error != INTERNAL and job.finished_at
    assert job.attempts == 1
    run_prune(ctx, job_id)  # a redelivery of the same message does nothing
    assert _get(ctx, job_id).attempts == 1


def test_measure_without_prune_output_fails_generically(ctx: TaskContext) -> None:
    """A bug-shaped failure (missing work files) becomes a generic reason, not a crash of the worker."""
    job_id, _ = _job(ctx.factory, ctx.store)
    with transaction(ctx.factory) as s:
        rows.claim_prune(s, job_id, "w")
    with transaction(ctx.factory) as s:
        rows.hand_to_measure(s, job_id)
    run_measure(ctx, job_id)
    job = _get(ctx, job_id)
    assert (job.status, job.error) == ("failed", INTERNAL)


def test_summary_carries_the_headline_numbers() -> None:
    import numpy as np

    report = {"speedup": np.float32(1.5), "achieved_sparsity": 0.6, "target_sparsity": 0.5,
              "latency_ms": {"dense": {"median": 2.0, "p90": 2.5}, "pruned": {"median": 1.0, "p90": 1.2}},
              "fidelity": {"cosine": 0.99, "top1_agreement": 1.0, "rel_l2": float("nan")},
              "macs": {"dense": 10, "pruned": 5}, "params": {"dense": 4, "pruned": 2}, "accuracy": None}
    s = summarize(report)
    assert s["speedup"] == 1.5 and s["latency_ms"] == {"dense": 2.0, "pruned": 1.0}
    assert s["fidelity"]["rel_l2"] is None, "non-finite floats are stored as null, not invalid JSON"
    assert "accuracy" not in s


def test_embedded_worker_recovers_after_a_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    worker = EmbeddedWorker(settings)
    queued, _ = _job(worker.ctx.factory, worker.ctx.store)
    orphan, _ = _job(worker.ctx.factory, worker.ctx.store)
    with transaction(worker.ctx.factory) as s:
        rows.claim_prune(s, orphan, "old-process")
    worker._recover()
    assert worker._queue.get_nowait() == ("prune", queued)
    job = _get(worker.ctx, orphan)
    assert job.status == "failed" and "stopped while this job ran" in (job.error or "")
