"""`GET /v1/jobs/{id}/events`: Server-Sent Events for one job.

The generator re-reads the row every `HWPRUNE_SSE_POLL_INTERVAL_S` (0.25 s) and sends an event whenever
status, stage or progress changed: `status` events for state changes, `progress` events otherwise. The row is
written at a bounded rate by the worker, so polling it is cheap and works identically with SQLite
(embedded) and PostgreSQL; the stream ends after the terminal state has been sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, TenantDep
from api.routes.common import not_found
from api.schemas import JobOut
from db.models import TERMINAL_STATUSES, Job
from db.repositories import get_owned

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _read(factory: sessionmaker[Session], tenant_id: str, job_id: str) -> dict[str, Any] | None:
    with factory() as session:
        job = get_owned(session, Job, tenant_id, job_id)
        return None if job is None else JobOut.of(job).model_dump(mode="json")


async def _stream(request: Request, tenant_id: str, job_id: str, interval: float) -> AsyncIterator[dict[str, str]]:
    factory = request.app.state.session_factory
    last: tuple[Any, ...] | None = None
    while True:
        snap = await run_in_threadpool(_read, factory, tenant_id, job_id)
        if snap is None:
            return
        key = (snap["status"], snap["stage"], snap["progress"], snap["cancel_requested"])
        if key != last:
            kind = "status" if last is None or last[0] != snap["status"] else "progress"
            yield {"event": kind, "id": f"{snap['progress']:.4f}", "data": json.dumps(snap)}
            last = key
        if snap["status"] in TERMINAL_STATUSES:
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(interval)


@router.get("/{job_id}/events", summary="Progress and status changes as Server-Sent Events",
            response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events `status` and `progress`, data = the job as JSON"}})
def job_events(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> EventSourceResponse:
    if get_owned(session, Job, tenant.id, job_id) is None:
        raise not_found("job", job_id)
    interval = request.app.state.settings.sse_poll_interval_s
    return EventSourceResponse(_stream(request, tenant.id, job_id, interval), ping=15)
