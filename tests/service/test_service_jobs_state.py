"""The job row state machine on PostgreSQL: row-locked claims, redelivery, cancel, terminal states."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as rows
from db.keys import create_key
from db.models import Job, ModelRecord
from db.session import make_engine, make_session_factory, transaction

pytestmark = pytest.mark.services


@pytest.fixture()
def factory(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(pg_url)
    yield make_session_factory(engine)
    engine.dispose()


def _new_job(factory: sessionmaker[Session]) -> str:
    with transaction(factory) as s:
        tenant, _ = create_key(s, f"state-{id(s)}")
        m = ModelRecord(tenant_id=tenant.id, name="m", format="onnx", opset=17, inputs=[], outputs=[], params=1,
                        macs=1, sha256="0" * 64, size_bytes=1)
        s.add(m)
        s.flush()
        j = Job(tenant_id=tenant.id, model_id=m.id, method="magnitude", granularity="channel", accelerator="cpu",
                spec={}, status="queued", progress=0.0, cancel_requested=False, attempts=0)
        s.add(j)
        s.flush()
        return j.id


def _get(factory: sessionmaker[Session], job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_redelivered_message_does_not_run_twice(factory: sessionmaker[Session]) -> None:
    job_id = _new_job(factory)
    with transaction(factory) as s:
        assert rows.claim_prune(s, job_id, "w1") is not None
    with transaction(factory) as s:
        assert rows.claim_prune(s, job_id, "w2") is None, "second delivery must find the job taken"
    job = _get(factory, job_id)
    assert (job.status, job.phase, job.worker, job.attempts) == ("running", "prune", "w1", 1)
    # The measure half is guarded the same way.
    with transaction(factory) as s:
        assert rows.hand_to_measure(s, job_id)
    with transaction(factory) as s:
        assert rows.claim_measure(s, job_id, "c1") is not None
    with transaction(factory) as s:
        assert rows.claim_measure(s, job_id, "c2") is None


def test_concurrent_claims_one_winner(factory: sessionmaker[Session]) -> None:
    """Eight threads race for one queued job on real PostgreSQL row locks: exactly one gets it."""
    for _ in range(3):
        job_id = _new_job(factory)
        wins: list[str] = []
        barrier = threading.Barrier(8)

        def claim(name: str, job_id: str = job_id, barrier: threading.Barrier = barrier,
                  wins: list[str] = wins) -> None:
            barrier.wait()
            with transaction(factory) as s:
                if rows.claim_prune(s, job_id, name) is not None:
                    wins.append(name)

        threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
        assert _get(factory, job_id).worker == wins[0]


def test_cancel_queued_running_and_finished(factory: sessionmaker[Session]) -> None:
    queued = _new_job(factory)
    with transaction(factory) as s:
        assert rows.request_cancel(s, _get(factory, queued)).status == "cancelled"
    with transaction(factory) as s:
        assert rows.claim_prune(s, queued, "w") is None, "a cancelled job must not start"

    running = _new_job(factory)
    with transaction(factory) as s:
        rows.claim_prune(s, running, "w")
    with transaction(factory) as s:
        job = rows.request_cancel(s, _get(factory, running))
        assert (job.status, job.cancel_requested) == ("running", True)
    with factory() as s:
        assert rows.cancel_requested(s, running)
    with transaction(factory) as s:
        assert rows.finish(s, running, "cancelled", error="cancelled by its owner")
    with transaction(factory) as s, pytest.raises(rows.TransitionRefused, match="already cancelled"):
        rows.request_cancel(s, _get(factory, running))
    with transaction(factory) as s:
        assert not rows.finish(s, running, "succeeded"), "terminal states are final"
    assert _get(factory, running).status == "cancelled"


def test_progress_only_while_running_and_clamped(factory: sessionmaker[Session]) -> None:
    job_id = _new_job(factory)
    with transaction(factory) as s:
        assert not rows.record_progress(s, job_id, "prune", 0.5, {}), "queued jobs take no progress"
        rows.claim_prune(s, job_id, "w")
    with transaction(factory) as s:
        assert rows.record_progress(s, job_id, "prune", 1.7, {"loss": 0.25})
    job = _get(factory, job_id)
    assert (job.stage, job.progress, job.progress_metrics) == ("prune", 1.0, {"loss": 0.25})
    with transaction(factory) as s:
        rows.finish(s, job_id, "succeeded", metrics={"speedup": 1.5, "achieved_sparsity": 0.5})
    job = _get(factory, job_id)
    assert (job.status, job.speedup, job.achieved_sparsity, job.phase) == ("succeeded", 1.5, 0.5, "done")


def test_redelivery_takes_over_only_from_a_dead_worker(factory: sessionmaker[Session]) -> None:
    """Celery requeues the message of a pool process that died; the row names the dead holder, so the new
    delivery may take the job over. A live holder (this process) keeps it."""
    import os
    import socket

    from worker.runner import worker_gone

    job_id = _new_job(factory)
    me = f"{socket.gethostname()}:{os.getpid()}"
    dead = subprocess_pid_that_exited()
    with transaction(factory) as s:
        assert rows.claim_prune(s, job_id, me) is not None
    with transaction(factory) as s:
        assert rows.claim_prune(s, job_id, "w2", worker_gone) is None, "holder alive: no second run"
    with transaction(factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(worker=f"{socket.gethostname()}:{dead}"))
    with transaction(factory) as s:
        job = rows.claim_prune(s, job_id, "w2", worker_gone)
        assert job is not None and job.worker == "w2" and job.attempts == 2
    assert not worker_gone(f"some-other-host:{dead}"), "other hosts cannot be checked: never assume dead"


def subprocess_pid_that_exited() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
