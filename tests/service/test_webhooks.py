"""Webhooks against a real local HTTP receiver (a `http.server` thread on 127.0.0.1): the payload, its
HMAC-SHA256 signature, retry with backoff after a 500, every attempt recorded; the API's callback_url rules;
and a real job run by `hwprune serve` whose terminal state is delivered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from db.ids import new_id
from db.models import Job, ModelRecord, Tenant, WebhookDelivery, utcnow
from db.session import make_engine, make_session_factory, transaction
from lifecycle.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookPolicy,
    deliver,
    sign,
    verify,
)
from tests.service.conftest import ApiHarness, Proc, free_port, service_env, wait_http

SECRET = "per-job-secret-0123456789"


@dataclass
class Hit:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next code from `codes` (the last one repeats) and records what it got."""

    codes: list[int]
    hits: list[Hit] = field(default_factory=list)
    url: str = ""
    got: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ThreadingHTTPServer:
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.hits.append(Hit(time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                code = rec.codes[min(len(rec.hits) - 1, len(rec.codes) - 1)]
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code < 300 else b"receiver says no")
                if code < 300:
                    rec.got.set()

            def log_message(self, *a: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv


@pytest.fixture()
def receiver_factory() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def make(codes: list[int]) -> Receiver:
        r = Receiver(codes)
        servers.append(r.start())
        return r

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def _terminal_job(url: str, callback_url: str, secret: str | None) -> tuple[Any, str]:
    """A finished job row on the real database, as the worker leaves it."""
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as s:
        t = Tenant(id=new_id(), name=f"wh-{new_id()[-8:]}")
        m = ModelRecord(id=new_id(), tenant_id=t.id, name="tiny", format="onnx", inputs=[], outputs=[], params=1,
                        macs=1, sha256="0" * 64, size_bytes=1)
        j = Job(id=new_id(), tenant_id=t.id, model_id=m.id, method="magnitude", granularity="channel",
                accelerator="cpu", spec={}, status="succeeded", progress=1.0, stage="done",
                metrics={"speedup": 1.5}, speedup=1.5, achieved_sparsity=0.5, cancel_requested=False, attempts=1,
                started_at=utcnow(), finished_at=utcnow(), callback_url=callback_url, callback_secret=secret)
        for row in (t, m, j):  # no relationship() between the models: flush in FK order
            s.add(row)
            s.flush()
        job_id = j.id
    return factory, job_id


@pytest.mark.services
def test_retry_after_500_then_signed_success_is_recorded(pg_url: str, receiver_factory: Any) -> None:
    rec = receiver_factory([500, 200])
    factory, job_id = _terminal_job(pg_url, rec.url, SECRET)
    policy = WebhookPolicy(timeout_s=5.0, max_attempts=4, backoff_s=0.3)
    assert deliver(factory, job_id, policy, default_secret=None) is True

    assert len(rec.hits) == 2, "one 500, then one success, then stop"
    # Backoff: the retry waited at least backoff_s (0.3 s) after the first answer; timer slack only adds time.
    assert rec.hits[1].at - rec.hits[0].at >= 0.3
    for hit in rec.hits:
        h = hit.headers
        assert h[EVENT_HEADER.lower()] == "job.succeeded"
        assert verify(SECRET, h[TIMESTAMP_HEADER.lower()], hit.body, h[SIGNATURE_HEADER.lower()])
        assert not verify("another-secret-0123456", h[TIMESTAMP_HEADER.lower()], hit.body,
                          h[SIGNATURE_HEADER.lower()]), "a different key must not verify"
        tampered = hit.body.replace(b'"succeeded"', b'"failed"')
        assert tampered != hit.body and not verify(SECRET, h[TIMESTAMP_HEADER.lower()], tampered,
                                                   h[SIGNATURE_HEADER.lower()])
    payload = json.loads(rec.hits[1].body)
    assert payload["event"] == "job.succeeded" and payload["delivery"] == rec.hits[1].headers[DELIVERY_HEADER.lower()]
    job = payload["job"]
    assert (job["id"], job["status"], job["speedup"], job["achieved_sparsity"]) == (job_id, "succeeded", 1.5, 0.5)
    assert job["artifacts"]["model.onnx"] == f"/v1/jobs/{job_id}/artifacts/model.onnx"
    assert SECRET not in rec.hits[1].body.decode(), "the secret must never be sent"

    with factory() as s:
        rows = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                         .order_by(WebhookDelivery.attempt)).all()
    assert [(r.attempt, r.status_code, r.ok) for r in rows] == [(1, 500, False), (2, 200, True)]
    assert rows[0].error and "500" in rows[0].error and rows[1].error is None
    assert all(r.url == rec.url and r.event == "job.succeeded" for r in rows)


@pytest.mark.services
def test_gives_up_after_max_attempts_and_unreachable_is_recorded(pg_url: str, receiver_factory: Any) -> None:
    rec = receiver_factory([503])
    factory, job_id = _terminal_job(pg_url, rec.url, SECRET)
    assert deliver(factory, job_id, WebhookPolicy(5.0, 3, 0.0), None) is False
    assert len(rec.hits) == 3
    # Nobody listening on a freed port: a network error, recorded without a status code.
    dead = f"http://127.0.0.1:{free_port()}/hook"
    factory2, job2 = _terminal_job(pg_url, dead, SECRET)
    assert deliver(factory2, job2, WebhookPolicy(2.0, 2, 0.0), None) is False
    with factory() as s:
        codes = [r.status_code for r in s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))]
        unreachable = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job2)).all()
    assert codes == [503, 503, 503]
    assert len(unreachable) == 2 and all(r.status_code is None and not r.ok and r.error for r in unreachable)


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    """The documented construction, recomputed independently with hashlib (what a receiver in any language does)."""
    import hashlib
    import hmac

    body, ts = b'{"a":1}', "1700000000"
    want = "sha256=" + hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k" * 16, ts, body) == want
    assert WebhookPolicy(backoff_s=2.0).delay(1) == 2.0 and WebhookPolicy(backoff_s=2.0).delay(3) == 8.0


@pytest.mark.services
def test_api_callback_url_rules(api: ApiHarness, tiny_onnx: Path) -> None:
    c, h = api.client, api.h()
    with open(tiny_onnx, "rb") as f:
        model = c.post("/v1/models", headers=h, files={"file": ("tiny.onnx", f)}).json()
    base = {"model_id": model["id"], "method": "magnitude", "target_sparsity": 0.5, "steps": 0}
    r = c.post("/v1/jobs", headers=h, json={**base, "callback_url": "ftp://127.0.0.1/x", "callback_secret": SECRET})
    assert r.status_code == 422 and "http" in r.text
    r = c.post("/v1/jobs", headers=h, json={**base, "callback_url": "http://127.0.0.1:9/x"})
    assert r.status_code == 422 and "callback_secret" in r.text, "no per-job key and no server key: refuse"
    hook = "https://hooks.example/x"
    r = c.post("/v1/jobs", headers=h, json={**base, "callback_url": hook, "callback_secret": "short"})
    assert r.status_code == 422
    r = c.post("/v1/jobs", headers=h, json={**base, "callback_url": hook, "callback_secret": SECRET})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["callback_url"] == "https://hooks.example/x" and SECRET not in r.text
    assert "callback_url" not in job["spec"], "callback fields are not pruning parameters"


@pytest.mark.slow
def test_embedded_job_delivers_its_terminal_state(tiny_onnx: Path, tmp_path: Path, receiver_factory: Any) -> None:
    """A real job through `hwprune serve`: the worker finishes it, then POSTs `job.succeeded`, signed with the
    server-wide key (no per-job secret given)."""
    rec = receiver_factory([200])
    server_secret = "server-wide-secret-0123456789"
    port = free_port()
    env = service_env(data_dir=str(tmp_path / "data"), webhook_secret=server_secret, webhook_backoff_s="0.1")
    srv = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log", tmp_path)
    try:
        key = srv.wait_for(r"^(hwp_\S+)$", timeout=120).group(1)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, timeout=60) as c:
            with open(tiny_onnx, "rb") as f:
                model = c.post("/v1/models", headers=h, files={"file": ("tiny.onnx", f)}).json()
            job = c.post("/v1/jobs", headers=h, json={
                "model_id": model["id"], "method": "magnitude", "granularity": "channel", "target_sparsity": 0.5,
                "steps": 2, "batch_size": 4, "latency_seconds": 0.5, "callback_url": rec.url}).json()
            assert rec.got.wait(180), f"no webhook arrived:\n{srv.text()[-3000:]}"
            final = c.get(f"/v1/jobs/{job['id']}", headers=h).json()
        assert final["status"] == "succeeded"
        hit = rec.hits[0]
        assert verify(server_secret, hit.headers[TIMESTAMP_HEADER.lower()], hit.body,
                      hit.headers[SIGNATURE_HEADER.lower()])
        sent = json.loads(hit.body)["job"]
        assert sent["id"] == job["id"] and sent["status"] == "succeeded"
        assert sent["speedup"] == final["speedup"], "the payload carries the measured summary"
    finally:
        srv.stop()
    with transaction(make_session_factory(make_engine(f"sqlite:///{tmp_path / 'data' / 'hwprune.db'}"))) as s:
        rows = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])).all()
        assert [(r.attempt, r.status_code, r.ok) for r in rows] == [(1, 200, True)]


@pytest.mark.services
def test_cancelling_a_queued_job_notifies(api: ApiHarness, tiny_onnx: Path, receiver_factory: Any) -> None:
    """A queued job cancelled through the API is terminal at once (no worker will see it): the API delivers."""
    rec = receiver_factory([200])
    c, h = api.client, api.h()
    with open(tiny_onnx, "rb") as f:
        model = c.post("/v1/models", headers=h, files={"file": ("tiny.onnx", f)}).json()
    job = c.post("/v1/jobs", headers=h, json={"model_id": model["id"], "method": "magnitude", "steps": 0,
                                              "callback_url": rec.url, "callback_secret": SECRET}).json()
    assert job["status"] == "queued", "no worker consumes in API-only tests"
    assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=h).json()["status"] == "cancelled"
    assert rec.got.wait(30), "no webhook for the cancelled job"
    hit = rec.hits[0]
    assert verify(SECRET, hit.headers[TIMESTAMP_HEADER.lower()], hit.body, hit.headers[SIGNATURE_HEADER.lower()])
    payload = json.loads(hit.body)
    assert payload["event"] == "job.cancelled" and payload["job"]["id"] == job["id"]
    assert payload["job"]["error"] == "cancelled before it started" and payload["job"]["artifacts"] is None


@pytest.mark.services
def test_claim_that_cancels_notifies_once_even_when_redelivered(pg_url: str, receiver_factory: Any,
                                                                tmp_path: Path) -> None:
    """A cancel that lands between enqueue and pick-up is finished by the worker's claim, not by the API:
    the worker delivers it, and a redelivered message for the same job does not deliver again."""
    from db.artifacts import ArtifactStore
    from hwprune.settings import Settings
    from worker.runner import TaskContext, run_prune

    rec = receiver_factory([200, 200])
    factory, job_id = _terminal_job(pg_url, rec.url, SECRET)
    with transaction(factory) as s:  # back to "queued with a cancel request", as a racing cancel leaves it
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.finished_at, job.cancel_requested = "queued", None, True
    ctx = TaskContext(factory, ArtifactStore(tmp_path), Settings(data_dir=tmp_path, database_url=pg_url),
                      enqueue_measure=lambda _: None)
    run_prune(ctx, job_id)
    assert rec.got.wait(30), "the claim cancelled the job but no webhook came"
    deadline = time.monotonic() + 10  # the attempt is recorded once the receiver's answer is back
    while time.monotonic() < deadline:
        with factory() as s:
            if s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).first() is not None:
                break
        time.sleep(0.05)
    run_prune(ctx, job_id)  # a redelivered message for a job whose notification is on record
    time.sleep(1.0)  # give a wrongly started second delivery time to arrive
    assert len(rec.hits) == 1 and json.loads(rec.hits[0].body)["event"] == "job.cancelled"
    with factory() as s:
        assert s.get(Job, job_id).status == "cancelled"  # type: ignore[union-attr]
        assert len(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).all()) == 1
