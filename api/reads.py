"""Single-statement reads on the API's hot paths (status polls, API-key checks, `/healthz`).

Each runs on an autocommit connection: a lone SELECT needs no transaction, so there is no BEGIN before it and no
ROLLBACK when the connection goes back to the pool. On PostgreSQL (psycopg) the read runs on the event loop
itself, through an asyncio engine that `start()` opens in the app's lifespan; the callables stay sync-style
`fn(conn)`, run by SQLAlchemy's `run_sync` without a thread. That saved ~0.25 ms of API CPU per status poll
and the GIL hand-offs between the loop and read threads (docs/benchmarks/service.md). SQLite, other drivers, and
an app used without its lifespan take one worker-thread hop instead. At most `max_concurrent` reads run at once,
fewer than the sync pool's `pool_size`: beyond that a burst of polls would open overflow connections (a new
PostgreSQL backend each, closed again on return).

The asyncio engine is a second pool on the same database. A disconnect seen by either pool (a database restart)
drops the other's connections too, so a restart costs one failed request, not one per pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from db.session import async_capable, make_async_engine

T = TypeVar("T")


class ReadPool:
    def __init__(self, engine: Engine, max_concurrent: int = 8, ping_idle_s: float | None = None) -> None:
        assert max_concurrent >= 1, "max_concurrent must be positive"
        self.sync_engine = engine
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.max_concurrent = max_concurrent
        self.ping_idle_s = ping_idle_s
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        self.aengine: AsyncEngine | None = None
        event.listen(engine, "handle_error", self._on_sync_error)

    async def start(self) -> None:
        """Open the asyncio engine (PostgreSQL + psycopg only), bound to the running event loop."""
        url = self.sync_engine.url.render_as_string(hide_password=False)
        if self.aengine is not None or not async_capable(url):
            return
        aengine = make_async_engine(url, ping_idle_s=self.ping_idle_s, pool_size=self.max_concurrent,
                                    max_overflow=0)
        event.listen(aengine.sync_engine, "handle_error", self._on_async_error)
        self.aengine = aengine.execution_options(isolation_level="AUTOCOMMIT")

    async def close(self) -> None:
        """Dispose of the asyncio engine (its connections belong to the loop that is ending)."""
        if self.aengine is not None:
            aengine, self.aengine = self.aengine, None
            await aengine.dispose()

    def _on_sync_error(self, ctx: ExceptionContext) -> None:
        if ctx.is_disconnect and self.aengine is not None:
            self.aengine.sync_engine.dispose(close=False)  # no I/O on sockets known to be dead

    def _on_async_error(self, ctx: ExceptionContext) -> None:
        if ctx.is_disconnect:
            self.sync_engine.dispose(close=False)

    def call(self, fn: Callable[[Connection], T]) -> T:
        """Blocking: `fn(conn)` on an autocommit connection."""
        with self.engine.connect() as conn:
            return fn(conn)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """`fn(conn)` on the event loop (asyncio engine) or in a worker thread; at most `max_concurrent` at once."""
        if self.aengine is None:
            return await anyio.to_thread.run_sync(self.call, fn, limiter=self.limiter)
        async with self.limiter, self.aengine.connect() as conn:
            return await conn.run_sync(fn)
