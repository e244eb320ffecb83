"""The status-poll hot path (issue 4): the API-key cache and its revocation bound, and `GET /v1/jobs/{id}`
answering exactly what its documented `JobOut` schema says although FastAPI no longer validates it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.app import create_app
from api.auth import KeyCache
from api.dispatch import CeleryDispatcher
from api.reads import ReadPool
from api.schemas import JobOut
from db.keys import KeyOwner, hash_key
from db.models import ApiKey, Job, ModelRecord, utcnow
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from tests.service.conftest import add_key

# --- KeyCache alone ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_key_cache_expires_after_its_ttl() -> None:
    clock = Clock()
    cache = KeyCache(ttl_s=5.0, max_size=10, clock=clock)
    owner = KeyOwner("t1", "acme")
    cache.put("d1", owner)
    clock.t = 4.9
    assert cache.get("d1") == owner
    clock.t = 5.0
    assert cache.get("d1") is None and len(cache) == 0, "an expired entry is dropped, not served"


def test_key_cache_is_bounded_oldest_first() -> None:
    cache = KeyCache(ttl_s=60.0, max_size=3, clock=Clock())
    for i in range(5):
        cache.put(f"d{i}", KeyOwner(f"t{i}", f"n{i}"))
    assert len(cache) == 3
    assert cache.get("d0") is None and cache.get("d1") is None
    assert cache.get("d4") == KeyOwner("t4", "n4")


def test_key_cache_ttl_zero_disables_it() -> None:
    cache = KeyCache(ttl_s=0.0, max_size=3, clock=Clock())
    cache.put("d", KeyOwner("t", "n"))
    assert cache.get("d") is None and len(cache) == 0


# --- the app on PostgreSQL -------------------------------------------------------------------------------------

@contextmanager
def _client(pg_url: str, redis_url: str, tmp_path: Path, **settings: float) -> Iterator[TestClient]:
    s = Settings(database_url=pg_url, broker_url=redis_url, data_dir=tmp_path / "data", sweep_interval_s=0,
                 **settings)  # type: ignore[arg-type]
    with TestClient(create_app(s, CeleryDispatcher(redis_url, s.visibility_timeout_s))) as client:
        yield client


@contextmanager
def _keyed_client(pg_url: str, redis_url: str, tmp_path: Path, tenant: str, **settings: float
                  ) -> Iterator[tuple[TestClient, str, dict[str, str]]]:
    """A fresh key of `tenant` and the app: (client, key, auth headers)."""
    key = add_key(pg_url, tenant)
    with _client(pg_url, redis_url, tmp_path, **settings) as client:
        yield client, key, {"Authorization": f"Bearer {key}"}


def _revoke(pg_url: str, key: str) -> None:
    engine = make_engine(pg_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            s.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=utcnow()))
    finally:
        engine.dispose()


@pytest.mark.services
def test_revoked_key_is_refused_once_the_auth_cache_ttl_has_passed(pg_url: str, redis_url: str,
                                                                   tmp_path: Path) -> None:
    with _keyed_client(pg_url, redis_url, tmp_path, "revoke-ttl", auth_cache_s=1.5) as (client, key, h):
        assert client.get("/v1/models", headers=h).status_code == 200  # verified once, now cached
        cache = client.app.state.auth.cache  # type: ignore[attr-defined]
        assert len(cache) == 1 and key not in cache._entries, "cached under sha256(key), never the plaintext"
        _revoke(pg_url, key)
        revoked_at = time.monotonic()
        # Within the TTL the cached verification still answers (the documented bound, not a leak) ...
        assert client.get("/v1/models", headers=h).status_code == 200
        # ... and once it has passed, the database says no.
        time.sleep(max(0.0, revoked_at + 1.6 - time.monotonic()))
        r = client.get("/v1/models", headers=h)
        assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API key"


@pytest.mark.services
def test_without_the_auth_cache_a_revoked_key_is_refused_at_once(pg_url: str, redis_url: str,
                                                                 tmp_path: Path) -> None:
    with _keyed_client(pg_url, redis_url, tmp_path, "revoke-now", auth_cache_s=0) as (client, key, h):
        assert client.get("/v1/jobs", headers=h).status_code == 200
        _revoke(pg_url, key)
        assert client.get("/v1/jobs", headers=h).status_code == 401


@pytest.mark.services
def test_status_poll_body_is_exactly_the_documented_jobout(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    """The route returns pre-built JSON (no response_model validation): it must still be JobOut, field for field,
    for a job with every optional part set, and the OpenAPI document must still say so."""
    key = add_key(pg_url, "poll-body")
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as s:
            tenant_id = s.scalar(ApiKey.__table__.select().with_only_columns(ApiKey.tenant_id)
                                 .where(ApiKey.key_hash == hash_key(key)))
            m = ModelRecord(tenant_id=tenant_id, name="m", format="onnx", opset=17, inputs=[], outputs=[], params=1,
                            macs=1, sha256="0" * 64, size_bytes=1, input_shape=[1, 3, 16, 16])
            s.add(m)
            s.flush()
            job = Job(tenant_id=tenant_id, model_id=m.id, method="smart", granularity="block",
                      accelerator={"block_shape": [4, 4]}, spec={"target_sparsity": 0.5, "note": "ünïcode"},
                      status="succeeded", phase="done", stage="done", progress=1.0,
                      metrics={"speedup": 1.7, "latency_ms": {"dense": 2.0, "pruned": 1.2}}, speedup=1.7,
                      achieved_sparsity=0.5, cancel_requested=False, attempts=1,
                      callback_url="https://example.test/hook")
            s.add(job)
            s.flush()
            job_id = job.id
        with factory() as s:
            row = s.get(Job, job_id)
            assert row is not None
            expected = JobOut.of(row).model_dump(mode="json")
    finally:
        engine.dispose()
    with _client(pg_url, redis_url, tmp_path) as client:
        r = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == expected
        assert JobOut.model_validate_json(r.content).model_dump(mode="json") == expected
        assert expected["artifacts"] and expected["started_at"] is None and expected["created_at"].endswith("+00:00")
        spec = client.get("/openapi.json").json()
        ok = spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"] == {"$ref": "#/components/schemas/JobOut"}
        assert client.get(f"/v1/jobs/{'0' * 32}", headers={"Authorization": f"Bearer {key}"}).status_code == 404
        other = add_key(pg_url, "poll-body-other")
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other}"}).status_code == 404


@pytest.mark.services
def test_postgres_hot_reads_run_on_the_event_loop_without_a_thread(pg_url: str, redis_url: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL (psycopg) the key check, the status poll and /healthz read through the asyncio engine: the
    thread-hop path (`ReadPool.call`) must not run; without the lifespan (no event loop of its own) it does."""
    calls: list[int] = []
    original = ReadPool.call
    monkeypatch.setattr(ReadPool, "call", lambda self, fn: calls.append(1) or original(self, fn))
    with _keyed_client(pg_url, redis_url, tmp_path, "on-the-loop", auth_cache_s=0) as (client, _, h):
        assert client.app.state.reads.aengine is not None  # type: ignore[attr-defined]
        assert client.get(f"/v1/jobs/{'0' * 32}", headers=h).status_code == 404
        assert client.get("/healthz").status_code == 200
        assert calls == [], "a hot read took the worker-thread path"
    assert client.app.state.reads.aengine is None, "the lifespan's end disposes the asyncio engine"  # type: ignore[attr-defined]
    unstarted = ReadPool(make_engine(pg_url))  # no lifespan ran start(): one thread hop per read
    assert anyio.run(unstarted.run, lambda conn: conn.exec_driver_sql("SELECT 1").scalar()) == 1
    assert calls == [1]
