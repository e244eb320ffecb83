"""Request dependencies as `Annotated` aliases (full-stack-fastapi-template style), so a route signature
reads as a sentence: `def get_job(job_id: str, session: SessionDep, tenant: TenantDep)`.

Every dependency here is `async def`: FastAPI runs a sync dependency in the threadpool, one hop (two for a
generator) per dependency per request, and none of these block (see docs/service.md, "Performance")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.auth import Authenticator
from api.bearer_gate import CHALLENGE, MISSING_KEY
from api.dispatch import Dispatcher
from api.problems import Problem
from db.artifacts import ArtifactStore
from db.keys import KeyOwner
from hwprune.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="API key from `hwprune keys create --tenant T`")


def _factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


async def get_session(request: Request) -> AsyncIterator[Session]:
    """Creating a Session does no I/O, so it happens on the event loop; only closing it (rollback, connection
    back to the pool) needs a worker thread. A sync generator would cost a threadpool hop each way."""
    session = _factory(request)()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SessionDep = Annotated[Session, Depends(get_session)]


async def get_tenant(request: Request,
                     creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> KeyOwner:
    """Async on purpose: a cached key (api/auth.py) resolves without a database round trip or a threadpool hop;
    a cache miss verifies on a connection of its own in one hop."""
    challenge = CHALLENGE
    if creds is None or creds.scheme.lower() != "bearer":  # api.bearer_gate refuses these first on /v1/
        raise Problem(401, MISSING_KEY, challenge)
    auth: Authenticator = request.app.state.auth
    tenant = await auth.owner(creds.credentials)
    if tenant is None:
        raise Problem(401, "unknown or revoked API key", challenge)
    return tenant


TenantDep = Annotated[KeyOwner, Depends(get_tenant)]


async def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
