"""Prometheus `/metrics` (jobs by state, durations, queue depth, broker queue length) on a real PostgreSQL
database and Redis broker, and CORS configured from settings (the other integration surface of issue 6)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.dispatch import CeleryDispatcher
from db.ids import new_id
from db.jobs import PRUNE_QUEUE
from db.migrate import upgrade
from db.models import Job, ModelRecord, Tenant, utcnow
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from tests.service.conftest import drop_pg_database, fresh_pg_database


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _seed(url: str) -> dict[str, Any]:
    """Jobs in every state; finished ones with known wall times."""
    now = utcnow()
    rows: list[Job] = []
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as s:
        t = Tenant(id=new_id(), name=f"m-{new_id()[-8:]}")
        s.add(t)
        s.flush()
        m = ModelRecord(id=new_id(), tenant_id=t.id, name="x", format="onnx", inputs=[], outputs=[], params=1,
                        macs=1, sha256="0" * 64, size_bytes=1)
        s.add(m)
        s.flush()

        def job(status: str, phase: str | None = None, secs: float | None = None) -> None:
            started = now - timedelta(seconds=secs) if secs is not None else None
            rows.append(Job(id=new_id(), tenant_id=t.id, model_id=m.id, method="magnitude", granularity="channel",
                            accelerator="cpu", spec={}, status=status, phase=phase, progress=0.0,
                            cancel_requested=False, attempts=0, started_at=started,
                            finished_at=now if secs is not None else None))

        for _ in range(3):
            job("queued")
        job("running", "prune")
        job("running", "measure_queued")
        job("running", "measure_queued")
        job("succeeded", "done", 3.0)
        job("succeeded", "done", 40.0)
        job("failed", "prune", 0.5)
        s.add_all(rows)
    return {"durations_succeeded": [3.0, 40.0], "durations_failed": [0.5]}


@pytest.mark.services
def test_metrics_reports_states_durations_and_queue_depth(redis_url: str, tmp_path: Path) -> None:
    name = fresh_pg_database("metrics")  # its own database: the counts below are exact
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        seeded = _seed(url)
        settings = Settings(database_url=url, broker_url=redis_url, data_dir=tmp_path)
        dispatcher = CeleryDispatcher(redis_url, settings.visibility_timeout_s)
        r = redis.Redis.from_url(redis_url)
        r.delete(PRUNE_QUEUE)
        with TestClient(create_app(settings, dispatcher)) as c:
            for i in range(2):  # real messages on the real broker; no worker consumes them in this test
                dispatcher.submit(f"metrics-probe-{i}")
            res = c.get("/metrics")
            in_broker = r.llen(PRUNE_QUEUE)
        r.delete(PRUNE_QUEUE)
    finally:
        drop_pg_database(name)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    got = _samples(res.text)
    states = {st: got[("hwprune_jobs", (("state", st),))] for st in
              ("queued", "running", "succeeded", "failed", "cancelled")}
    assert states == {"queued": 3, "running": 3, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert got[("hwprune_queue_depth", (("queue", "prune"),))] == 3
    assert got[("hwprune_queue_depth", (("queue", "measure"),))] == 2
    # >= 2, not == 2: a sweeper in the app may legitimately re-send the seeded queued jobs; the metric must
    # equal what Redis itself holds right after the scrape.
    assert got[("hwprune_broker_queue_length", (("queue", PRUNE_QUEUE),))] == in_broker >= 2

    ok = (("status", "succeeded"),)
    assert got[("hwprune_job_duration_seconds_count", ok)] == 2
    # started_at/finished_at round-trip through PostgreSQL at microsecond precision.
    assert abs(got[("hwprune_job_duration_seconds_sum", ok)] - sum(seeded["durations_succeeded"])) < 1e-3
    assert got[("hwprune_job_duration_seconds_bucket", (("le", "5.0"), ("status", "succeeded")))] == 1
    assert got[("hwprune_job_duration_seconds_bucket", (("le", "60.0"), ("status", "succeeded")))] == 2
    assert got[("hwprune_job_duration_seconds_bucket", (("le", "1.0"), ("status", "failed")))] == 1


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    from worker.embedded import EmbeddedWorker

    settings = Settings(data_dir=tmp_path, metrics_enabled=False)
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, EmbeddedWorker(settings))) as c:
        assert c.get("/metrics").status_code == 404
        assert c.get("/dashboard").status_code == 200, "the dashboard does not depend on metrics"


def test_cors_allows_only_the_configured_origins(tmp_path: Path) -> None:
    from worker.embedded import EmbeddedWorker

    settings = Settings(data_dir=tmp_path, cors_origins=["https://dash.example"])
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, EmbeddedWorker(settings))) as c:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = c.options("/v1/jobs", headers={"Origin": "https://dash.example", **pre})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://dash.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        bad = c.options("/v1/jobs", headers={"Origin": "https://evil.example", **pre})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
        # a keyless call is refused by the bearer gate, inside CORS, so a dashboard on the origin can read the 401
        keyless = c.get("/v1/jobs", headers={"Origin": "https://dash.example"})
        assert keyless.status_code == 401 and keyless.headers["access-control-allow-origin"] == "https://dash.example"
        simple = c.get("/healthz", headers={"Origin": "https://dash.example"})
        assert simple.headers["access-control-allow-origin"] == "https://dash.example"
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "https://evil.example"}).headers
