"""Request dependencies as `Annotated` aliases (full-stack-fastapi-template style), so a route signature
reads as a sentence: `def get_job(job_id: str, session: SessionDep, tenant: TenantDep)`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from api.dispatch import Dispatcher
from api.problems import Problem
from db.artifacts import ArtifactStore
from db.keys import verify_key
from db.models import Tenant
from hwprune.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="API key from `hwprune keys create --tenant T`")


def _factory(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


def get_session(request: Request) -> Iterator[Session]:
    with _factory(request)() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(session: SessionDep,
               creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    """Uses the request's own session (FastAPI caches SessionDep per request): one connection per request."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if creds is None or creds.scheme.lower() != "bearer":
        raise Problem(401, "send `Authorization: Bearer <api key>`; create a key with "
                           "`hwprune keys create --tenant NAME`", challenge)
    tenant = verify_key(session, creds.credentials)
    if tenant is None:
        raise Problem(401, "unknown or revoked API key", challenge)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def get_store(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.store
    return store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
