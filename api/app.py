"""FastAPI application factory: wires settings, database, artifact store and a job dispatcher.

`create_app` never runs migrations (full-stack-fastapi-template: migrations are their own step); the embedded
`hwprune serve` upgrades its own SQLite file before calling it (see hwprune/cli_service.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api import dashboard, metrics, problems
from api.auth import Authenticator
from api.bearer_gate import RequireBearer
from api.dispatch import CeleryDispatcher, Dispatcher
from api.reads import ReadPool
from api.routes import accelerators, datasets, events, jobs, models
from db.artifacts import ArtifactStore
from db.session import make_engine, make_session_factory
from hwprune.settings import Settings
from lifecycle.sweeper import Sweeper

log = logging.getLogger("hwprune.api")


def create_app(settings: Settings, dispatcher: Dispatcher | None = None, sweep: bool = True) -> FastAPI:
    """`sweep=False`: this process runs no sweeper (a worker process of a multi-process `serve`, whose
    supervising process runs the one sweeper)."""
    if dispatcher is None:
        assert settings.broker_url, "without a broker the caller must pass the embedded worker as dispatcher"
        dispatcher = CeleryDispatcher(settings.broker_url, settings.visibility_timeout_s)
    engine = make_engine(settings.resolved_database_url, ping_idle_s=settings.db_ping_idle_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await reads.start()
        start = getattr(dispatcher, "start", None)
        if start is not None:
            start()
        sweeper = start_sweeper(settings, app.state.session_factory, dispatcher) if sweep else None
        if sweeper is not None:
            app.state.sweeper = sweeper
        yield
        if sweeper is not None:
            sweeper.stop()
        stop = getattr(dispatcher, "stop", None)
        if stop is not None:
            stop()
        await reads.close()
        engine.dispose()

    app = FastAPI(title="hwprune", version="1", lifespan=lifespan,
                  description="Hardware-aware model compression: upload a model, submit a pruning job, "
                              "download the pruned ONNX and its report. Auth: `Authorization: Bearer <key>`.")
    app.state.settings = settings
    app.state.engine = engine
    # hot single-statement reads, on the event loop where the driver allows (api/reads.py)
    app.state.reads = reads = ReadPool(engine, ping_idle_s=settings.db_ping_idle_s)
    app.state.auth = Authenticator(reads, settings.auth_cache_s, settings.auth_cache_size)
    app.state.session_factory = make_session_factory(engine)
    app.state.store = ArtifactStore(settings.data_dir)
    app.state.dispatcher = dispatcher
    app.add_middleware(RequireBearer)  # added first, so CORSMiddleware (added next) wraps it
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                       allow_headers=["*"], expose_headers=["Location"])
    problems.install(app)
    _install_db_down(app, settings.retry_after_s)
    _document_problems(app)
    for r in (models.router, datasets.router, accelerators.router, jobs.router, events.router):
        app.include_router(r)
    dashboard.install(app)  # /dashboard (api/dashboard/)
    if settings.metrics_enabled:
        app.include_router(metrics.make_router(app.state.session_factory, settings.broker_url))

    @app.get("/healthz", tags=["health"], summary="Liveness + database reachability (no auth)")
    async def healthz() -> dict[str, Any]:
        await reads.run(lambda conn: conn.execute(text("SELECT 1")))
        return {"status": "ok", "mode": "embedded" if settings.embedded else "celery"}

    return app


def create_worker_app() -> FastAPI:
    """uvicorn factory (`api.app:create_worker_app`) for each process of `hwprune serve --workers N`: settings
    from the environment, Celery dispatch (N > 1 needs a broker), no sweeper (the supervisor runs it); startup
    objects frozen as in single-process `serve` (api/gc_tuning.py)."""
    from api.gc_tuning import freeze_startup_objects
    from hwprune.settings import get_settings

    app = create_app(get_settings(), sweep=False)
    freeze_startup_objects()
    return app


def start_sweeper(settings: Settings, factory: sessionmaker[Session], dispatcher: Dispatcher | None = None
                  ) -> Sweeper | None:
    """With a broker, one process per `serve` re-sends lost messages and recovers jobs of vanished workers
    (lifecycle/sweeper.py); the embedded worker recovers on start instead. Returns the started sweeper."""
    if settings.embedded or settings.sweep_interval_s <= 0:
        return None
    celery = dispatcher.app if isinstance(dispatcher, CeleryDispatcher) else \
        CeleryDispatcher(settings.broker_url or "", settings.visibility_timeout_s).app

    def send(task: str, queue: str, job_id: str) -> None:
        celery.send_task(task, args=[job_id], queue=queue)

    sweeper = Sweeper(factory, settings, send)
    sweeper.start()
    return sweeper


def _install_db_down(app: FastAPI, retry_after_s: int) -> None:
    """Database unreachable (restart, failover): 503 + Retry-After instead of a 500. Recovery needs nothing: a
    connection idle for over `db_ping_idle_s` is pinged before use and replaced if dead; one that dies while in
    use fails its request (this 503) and makes the pool replace every older connection (db/session.py)."""

    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unreachable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return problems.problem_response(request, 503, "the database is unreachable; retry after "
                                                        f"{retry_after_s} s", {"Retry-After": str(retry_after_s)})

    for exc_type in (OperationalError, InterfaceError, DisconnectionError):
        app.add_exception_handler(exc_type, _db_down)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem", "type": "object", "description": "RFC 9457 problem details (api/problems.py)",
    "required": ["type", "title", "status", "detail"], "additionalProperties": True,
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "instance": {"type": "string"},
                   "errors": {"type": "array", "items": {"type": "object"}}},
}


def _document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API answers on errors: every 4xx/5xx (422 included, which
    FastAPI documents as its own JSON validation body) is `application/problem+json`; a `default` response
    covers the rest (401, 404, 409, 413, 503). Found by the schemathesis run in tests/service/test_fuzz_api.py."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for code, resp in responses.items():
                    if code[:1] in ("4", "5"):
                        resp["content"] = problem
                responses.setdefault("default", {"description": "an error, as RFC 9457 problem+json",
                                                 "content": problem})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
