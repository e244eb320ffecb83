"""`/v1/jobs`: submit (202 + Location), list with filters, read, cancel, download artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import DispatcherDep, SessionDep, StoreDep, TenantDep
from api.problems import Problem
from api.reads import ReadPool
from api.routes.common import CursorQ, LimitQ, check_cursor, not_found
from api.schemas import JobOut, JobRequest, JobStatus, Page
from db.artifacts import JOB_ARTIFACTS
from db.ids import new_id
from db.jobs import TransitionRefused, request_cancel
from db.models import TERMINAL_STATUSES, DatasetRecord, Job, ModelRecord, utcnow
from db.repositories import get_owned, page, read_owned
from lifecycle.webhooks import notify_terminal
from pruning_core.spec import PruneSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("hwprune.api")


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=128,
    description="retry-safe submission: the same key (per tenant) returns the job it first created (200); "
                "reusing it for a different request is a 422")]


def _hash_request(body: JobRequest) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _earlier(session: Session, tenant_id: str, key: str, req_hash: str, response: Response) -> JobOut | None:
    """The job an earlier request with this Idempotency-Key created (answered 200), or None."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.request_hash != req_hash:
        raise Problem(422, f"Idempotency-Key {key!r} was already used for a different job request; send a new "
                           "key for a new job, or repeat the original request unchanged")
    response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.post("", status_code=202, response_model=JobOut, summary="Submit a pruning job",
             responses={202: {"headers": {"Location": {"description": "the job's URL",
                                                       "schema": {"type": "string"}}}},
                        200: {"model": JobOut, "description": "the job an earlier request with the same "
                                                              "Idempotency-Key created"}})
def create_job(body: JobRequest, request: Request, response: Response, session: SessionDep, tenant: TenantDep,
               dispatcher: DispatcherDep, idempotency_key: IdempotencyKey = None) -> JobOut:
    req_hash = _hash_request(body) if idempotency_key is not None else None
    if idempotency_key is not None and req_hash is not None:
        earlier = _earlier(session, tenant.id, idempotency_key, req_hash, response)
        if earlier is not None:
            return earlier
    model = get_owned(session, ModelRecord, tenant.id, body.model_id)
    if model is None:
        raise not_found("model", body.model_id)
    if body.dataset_id is not None and get_owned(session, DatasetRecord, tenant.id, body.dataset_id) is None:
        raise not_found("dataset", body.dataset_id)
    if body.callback_url and not (body.callback_secret or request.app.state.settings.webhook_secret):
        raise Problem(422, "callback_url needs a signing key: pass callback_secret (16+ characters) or have the "
                           "operator set HWPRUNE_WEBHOOK_SECRET")
    spec_d = body.spec_dict()
    if "input_shape" not in spec_d and model.input_shape:
        spec_d["input_shape"] = list(model.input_shape)
    try:
        spec = PruneSpec.from_dict(spec_d)  # InvalidRequest -> 422 with PruneSpec's message
    except (TypeError, ValueError) as e:  # e.g. a string where PruneSpec compares numbers
        raise Problem(422, f"invalid job parameters: {e}") from e
    job = Job(
        id=new_id(), tenant_id=tenant.id, model_id=model.id, dataset_id=body.dataset_id, method=spec.method,
        granularity=spec.resolved_granularity, accelerator=spec.accelerator, spec=spec.to_dict(),
        status="queued", progress=0.0, cancel_requested=False, attempts=0,
        callback_url=body.callback_url, callback_secret=body.callback_secret,
        idempotency_key=idempotency_key, request_hash=req_hash,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the unique index
        session.rollback()
        if idempotency_key is None or req_hash is None:
            raise
        earlier = _earlier(session, tenant.id, idempotency_key, req_hash, response)
        assert earlier is not None, "unique violation without an earlier job for this Idempotency-Key"
        return earlier
    try:
        dispatcher.submit(job.id)
    except Exception as e:
        log.exception("could not enqueue job %s", job.id)
        job.status, job.error, job.finished_at = "failed", f"could not enqueue the job: {e}", utcnow()
        session.commit()
        notify_terminal(request.app.state.session_factory, request.app.state.settings, job.id)
        raise Problem(503, "the job queue is unreachable; the job was recorded as failed, retry later") from e
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("", response_model=Page[JobOut], summary="List your jobs, newest first")
def list_jobs(session: SessionDep, tenant: TenantDep, limit: LimitQ = 50, cursor: CursorQ = None,
              status: JobStatus | None = None, model_id: str | None = None,
              method: str | None = None) -> Page[JobOut]:
    rows, nxt = page(session, Job, tenant.id, limit, check_cursor(cursor), status=status, model_id=model_id,
                     method=method)
    return Page[JobOut](items=[JobOut.of(j) for j in rows], next_cursor=nxt)


@router.get("/{job_id}", response_model=JobOut, summary="One job: status, progress, stage, metrics, error")
async def get_job(job_id: str, request: Request, tenant: TenantDep) -> Response:
    # The status poll, the API's hottest route (a comment, not a docstring: that would change the OpenAPI text).
    # Async: the tenant comes from the key cache (api/auth.py), the row from one SELECT on an autocommit
    # connection (api/reads.py: on the event loop on PostgreSQL, one thread hop elsewhere; no Session, no
    # BEGIN/ROLLBACK), and the JSON is built once;
    # `response_model` documents the body, FastAPI does not validate it again.
    reads: ReadPool = request.app.state.reads
    body = await reads.run(partial(_job_json, tenant_id=tenant.id, job_id=job_id))
    if body is None:
        raise not_found("job", job_id)
    return Response(body, media_type="application/json")


def _job_json(conn: Connection, tenant_id: str, job_id: str) -> bytes | None:
    row = read_owned(conn, Job, tenant_id, job_id)
    return None if row is None else JobOut.of(row).model_dump_json().encode()


@router.post("/{job_id}/cancel", response_model=JobOut, summary="Stop a queued or running job")
def cancel_job(job_id: str, request: Request, session: SessionDep, tenant: TenantDep) -> JobOut:
    job = get_owned(session, Job, tenant.id, job_id)
    if job is None:
        raise not_found("job", job_id)
    try:
        job = request_cancel(session, job)
    except TransitionRefused as e:
        session.rollback()
        raise Problem(409, str(e)) from e
    session.commit()
    if job.status in TERMINAL_STATUSES:  # a queued job is cancelled at once: no worker will report it
        notify_terminal(request.app.state.session_factory, request.app.state.settings, job.id)
    return JobOut.of(job)


@router.get("/{job_id}/artifacts/{name}", summary="Download the pruned model.onnx or report.json",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}}})
def get_artifact(job_id: str, name: str, session: SessionDep, tenant: TenantDep, store: StoreDep) -> FileResponse:
    job = get_owned(session, Job, tenant.id, job_id)
    if job is None:
        raise not_found("job", job_id)
    if name not in JOB_ARTIFACTS:
        raise Problem(404, f"no artifact {name!r}; jobs have {', '.join(JOB_ARTIFACTS)}")
    if job.status != "succeeded":
        raise Problem(409, f"job is {job.status}; artifacts are available once it has succeeded")
    path = store.job_artifact(job.tenant_id, job.id, name)
    if not path.is_file():
        raise Problem(404, f"artifact {name} is missing from the artifact store")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=f"{job.id}-{name}")
