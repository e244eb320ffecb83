"""Keep the garbage collector's full collections off the request path of a long-running API process.

Why: under polling load the API ran a full (generation 2) collection every few seconds, and each took 70-110 ms
on this machine because it walked every object of the imported libraries (FastAPI, pydantic, SQLAlchemy, the
Celery client: ~110k objects). Each pause stalled every request in flight, and that set the p99 of both
`GET /v1/jobs/{id}` and `/healthz` (docs/benchmarks/service.md). `gc.freeze()`, called once the app is built,
moves those long-lived objects to a permanent generation that collections skip, so a full collection walks only
what was allocated since. Cyclic garbage made later is still collected.

Called by the `serve` entry points only, not by `create_app`: a test process that builds many apps should not
pin whatever happens to be alive at each start.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("hwprune.api")


def freeze_startup_objects() -> int:
    """Collect once (so no garbage is pinned), then freeze everything that survived; returns how many objects
    were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's reach", frozen)
    return frozen
