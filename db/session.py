"""Engines and sessions for PostgreSQL (scaled) and SQLite (embedded default).

SQLite runs in WAL mode with a busy timeout so the API and the embedded worker thread can write concurrently;
foreign keys are switched on because SQLite leaves them off by default.

PostgreSQL pools pre-ping every checkout by default (`pool_pre_ping`: one `SELECT 1` round trip each time), which
long-running workers want. The API passes `ping_idle_s` instead: only a connection that sat unused in the pool for
longer than that is pinged. A connection used moments ago is known to work, and one that died since (database
restart under load) fails its query with a disconnect error: SQLAlchemy then invalidates every pooled connection
older than that moment, the API answers that request 503 + Retry-After, and the next one connects afresh.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, ping_idle_s: float | None = None, **kw: Any) -> Engine:
    """`ping_idle_s` (PostgreSQL only): ping connections idle longer than this instead of every checkout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kw.setdefault("pool_pre_ping", ping_idle_s is None)
    kw.setdefault("pool_size", 10)
    kw.setdefault("max_overflow", 20)
    engine = create_engine(url, **kw)
    if ping_idle_s is not None:
        _ping_when_idle(engine, ping_idle_s)
    return engine


def async_capable(url: str) -> bool:
    """True for PostgreSQL through psycopg (3), whose asyncio connection `make_async_engine` can use; SQLite and
    other drivers keep to threads."""
    u = make_url(url)
    return u.get_backend_name() == "postgresql" and u.get_driver_name() in ("psycopg", "psycopg_async")


def make_async_engine(url: str, ping_idle_s: float | None = None, **kw: Any) -> AsyncEngine:
    """The asyncio twin of `make_engine` for PostgreSQL (see `async_capable`): the API's single-statement reads
    run on its event loop with no worker-thread hop. Same idle-only pinging."""
    assert async_capable(url), f"no asyncio driver for {make_url(url).drivername}"
    kw.setdefault("pool_pre_ping", ping_idle_s is None)
    engine = create_async_engine(url, **kw)
    if ping_idle_s is not None:
        _ping_when_idle(engine.sync_engine, ping_idle_s)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Pre-ping, but only connections that were idle in the pool for more than `idle_s` seconds. A failed ping
    raises InvalidatePoolError: SQLAlchemy replaces this connection and invalidates all older pooled ones."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, rec: Any) -> None:
        rec.info["hwprune_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, rec: Any, _proxy: Any) -> None:
        since = rec.info.pop("hwprune_idle_since", None)
        if since is None or time.monotonic() - since <= idle_s:
            return  # new connection, or one that worked moments ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as e:
            raise InvalidatePoolError(f"idle connection failed its ping: {e}") from e


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error, always close."""
    with factory() as session, session.begin():
        yield session
