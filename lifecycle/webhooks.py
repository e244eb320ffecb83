"""Webhook delivery: when a job reaches a terminal state, POST its summary to the job's `callback_url`.

Contract (docs/dashboard.md): the body is JSON `{"event": "job.<status>", "delivery": <id>, "job": {...}}`;
`X-Hwprune-Timestamp` is the unix time of the attempt and `X-Hwprune-Signature` is
`sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`, the Stripe/GitHub scheme: the timestamp inside the
signed bytes lets a receiver reject replays. The secret is the job's `callback_secret`, else the server's
`HWPRUNE_WEBHOOK_SECRET`. Any non-2xx answer or network error is retried with exponential backoff
(`webhook_backoff_s * 2**(k-1)` before retry k) up to `webhook_max_attempts`; every attempt is a
`webhook_deliveries` row so a user can see why a callback did not arrive.

Delivery runs in a daemon thread started by `notify_terminal`, so a slow or dead receiver never holds a worker
slot and a webhook failure can never change the job's state (the job row is final before we are called).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.ids import new_id
from db.models import TERMINAL_STATUSES, Job, WebhookDelivery
from db.session import transaction
from hwprune.settings import Settings

log = logging.getLogger("hwprune.webhooks")
SIGNATURE_HEADER = "X-Hwprune-Signature"
TIMESTAMP_HEADER = "X-Hwprune-Timestamp"
EVENT_HEADER = "X-Hwprune-Event"
DELIVERY_HEADER = "X-Hwprune-Delivery"


@dataclass(frozen=True)
class WebhookPolicy:
    timeout_s: float = 10.0  # per attempt
    max_attempts: int = 5  # first try + retries
    backoff_s: float = 2.0  # wait before retry k is backoff_s * 2**(k-1)

    @classmethod
    def of(cls, settings: Settings) -> WebhookPolicy:
        return cls(settings.webhook_timeout_s, settings.webhook_max_attempts, settings.webhook_backoff_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
        assert attempt >= 1, "attempts are 1-based"
        return float(self.backoff_s * 2 ** (attempt - 1))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does (constant-time compare); used by the tests and shown in docs/dashboard.md."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).isoformat()


def job_summary(job: Job) -> dict[str, Any]:
    """The job as the API shows it, minus the secret; artifact links are relative to the API's base URL."""
    arts = None
    if job.status == "succeeded":
        arts = {n: f"/v1/jobs/{job.id}/artifacts/{n}" for n in ("model.onnx", "report.json")}
    return {
        "id": job.id, "status": job.status, "model_id": job.model_id, "dataset_id": job.dataset_id,
        "method": job.method, "granularity": job.granularity, "accelerator": job.accelerator,
        "stage": job.stage, "progress": job.progress, "error": job.error, "metrics": job.metrics,
        "speedup": job.speedup, "achieved_sparsity": job.achieved_sparsity,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "artifacts": arts,
    }


@dataclass(frozen=True)
class _Target:
    tenant_id: str
    url: str
    secret: str | None
    event: str
    body: bytes
    delivery: str


def _target(factory: sessionmaker[Session], job_id: str, default_secret: str | None) -> _Target | None:
    with factory() as s:
        job = s.get(Job, job_id)
        if job is None or not job.callback_url:
            return None
        assert job.status in TERMINAL_STATUSES, f"webhook for job {job_id} in non-terminal state {job.status}"
        delivery = new_id()
        event = f"job.{job.status}"
        body = json.dumps({"event": event, "delivery": delivery, "job": job_summary(job)},
                          separators=(",", ":"), sort_keys=True).encode()
        return _Target(job.tenant_id, job.callback_url, job.callback_secret or default_secret, event, body,
                       delivery)


def _attempt(client: httpx.Client, t: _Target) -> tuple[int | None, str | None]:
    ts = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "hwprune-webhooks/1", EVENT_HEADER: t.event,
               DELIVERY_HEADER: t.delivery, TIMESTAMP_HEADER: ts}
    if t.secret:
        headers[SIGNATURE_HEADER] = sign(t.secret, ts, t.body)
    try:
        r = client.post(t.url, content=t.body, headers=headers)
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}"[:2000]
    if 200 <= r.status_code < 300:
        return r.status_code, None
    return r.status_code, f"HTTP {r.status_code}: {r.text[:500]}"


def deliver(factory: sessionmaker[Session], job_id: str, policy: WebhookPolicy, default_secret: str | None,
            sleep: Callable[[float], None] = time.sleep) -> bool:
    """Deliver one terminal event with retries, recording each attempt. True once a receiver answered 2xx;
    False when every attempt failed or the job has no callback."""
    t = _target(factory, job_id, default_secret)
    if t is None:
        return False
    with httpx.Client(timeout=policy.timeout_s, follow_redirects=False) as client:
        for attempt in range(1, policy.max_attempts + 1):
            started = time.monotonic()
            code, error = _attempt(client, t)
            ms = (time.monotonic() - started) * 1000.0
            with transaction(factory) as s:
                s.add(WebhookDelivery(tenant_id=t.tenant_id, job_id=job_id, url=t.url, event=t.event,
                                      attempt=attempt, status_code=code, ok=error is None, error=error,
                                      duration_ms=ms))
            if error is None:
                log.info("webhook %s for job %s delivered (attempt %d)", t.event, job_id, attempt)
                return True
            log.warning("webhook %s for job %s attempt %d failed: %s", t.event, job_id, attempt, error)
            if attempt < policy.max_attempts:
                sleep(policy.delay(attempt))
    return False


def notify_terminal(factory: sessionmaker[Session], settings: Settings, job_id: str) -> threading.Thread | None:
    """Call after a job row became terminal. Starts delivery in a daemon thread and returns it (tests join it);
    never raises: a webhook problem must not touch the job."""
    try:
        with factory() as s:
            job = s.get(Job, job_id)
            url = job.callback_url if job is not None else None
        if not url:
            return None
        policy, secret = WebhookPolicy.of(settings), settings.webhook_secret

        def run() -> None:
            try:
                deliver(factory, job_id, policy, secret)
            except Exception:
                log.exception("webhook delivery for job %s crashed", job_id)

        th = threading.Thread(target=run, name=f"hwprune-webhook-{job_id[:8]}", daemon=True)
        th.start()
        return th
    except Exception:
        log.exception("could not start webhook delivery for job %s", job_id)
        return None


def notify_if_undelivered(factory: sessionmaker[Session], settings: Settings, job_id: str) -> threading.Thread | None:
    """For paths that may or may not have just ended a job (a claim that found it cancelled or out of attempts):
    deliver only when the job is terminal and no delivery was attempted yet, so a redelivered message for a
    long-finished job does not notify twice."""
    try:
        with factory() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in TERMINAL_STATUSES or not job.callback_url:
                return None
            seen = s.scalar(select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
            if seen:
                return None
    except Exception:
        log.exception("webhook check for job %s failed", job_id)
        return None
    return notify_terminal(factory, settings, job_id)
