"""Single-statement reads on the API's hot paths (status polls, API-key checks, `/healthz`).

Each runs in one worker-thread hop on an autocommit connection: a lone SELECT needs no transaction, so there is
no BEGIN before it and no ROLLBACK when the connection goes back to the pool. At most `max_concurrent` run at
once, fewer than the pool's `pool_size`: beyond that, a burst of polls would open overflow connections (a new
PostgreSQL backend each, closed again on return) and more threads would only contend for the GIL on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Connection, Engine

T = TypeVar("T")


class ReadPool:
    def __init__(self, engine: Engine, max_concurrent: int = 8) -> None:
        assert max_concurrent >= 1, "max_concurrent must be positive"
        self.engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.limiter = anyio.CapacityLimiter(max_concurrent)

    def call(self, fn: Callable[[Connection], T]) -> T:
        """Blocking: `fn(conn)` on an autocommit connection."""
        with self.engine.connect() as conn:
            return fn(conn)

    async def run(self, fn: Callable[[Connection], T]) -> T:
        """`fn(conn)` in a worker thread, at most `max_concurrent` at a time."""
        return await anyio.to_thread.run_sync(self.call, fn, limiter=self.limiter)
