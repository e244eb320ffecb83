"""How the API hands a job to a worker: Celery (broker set) or the embedded worker `serve` starts.

Only the job id travels; the row is the source of truth (see db/jobs.py).
"""

from __future__ import annotations

from typing import Protocol

from celery import Celery

from db.jobs import PRUNE_QUEUE, PRUNE_TASK


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...


class CeleryDispatcher:
    """Sends by task name so the API process never imports the worker (and torch)."""

    def __init__(self, broker_url: str, visibility_timeout_s: int) -> None:
        self.app = Celery("hwprune-api", broker=broker_url)
        self.app.conf.broker_connection_retry_on_startup = True
        self.app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout_s}

    def submit(self, job_id: str) -> None:
        self.app.send_task(PRUNE_TASK, args=[job_id], queue=PRUNE_QUEUE, retry=True,
                           retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
