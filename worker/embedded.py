"""The embedded worker `hwprune serve` starts when no broker is configured.

Threads in the API process consume a local queue and call the same `run_prune` / `run_measure` the Celery
tasks call, so the embedded default exercises the production task code. There is no broker to redeliver,
so on start it re-queues `queued` jobs and fails jobs left `running` by a previous process (they cannot be
resumed: the process that ran them is gone). Time limits are enforced through the cancel callback.
"""

from __future__ import annotations

import logging
import queue
import threading

from sqlalchemy import select

from db import jobs as rows
from db.artifacts import ArtifactStore
from db.models import Job
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from lifecycle.webhooks import notify_terminal
from worker.runner import TaskContext, run_measure, run_prune

log = logging.getLogger("hwprune.worker")
_STOP = ("stop", "")


class EmbeddedWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        engine = make_engine(settings.resolved_database_url)
        self.ctx = TaskContext(
            factory=make_session_factory(engine), store=ArtifactStore(settings.data_dir), settings=settings,
            enqueue_measure=lambda job_id: self._queue.put(("measure", job_id)),
            time_limit_s=float(settings.job_soft_time_limit_s),
        )

    # Dispatcher protocol (api/dispatch.py)
    def submit(self, job_id: str) -> None:
        self._queue.put(("prune", job_id))

    def start(self) -> None:
        self._recover()
        for i in range(self.settings.embedded_workers):
            t = threading.Thread(target=self._loop, name=f"hwprune-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 2.0) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout)

    def _recover(self) -> None:
        with transaction(self.ctx.factory) as s:
            queued = s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.id)).all()
            orphans = s.scalars(select(Job.id).where(Job.status == "running")).all()
            for job_id in orphans:
                rows.finish(s, job_id, "failed", error="the server stopped while this job ran; submit it again")
        for job_id in orphans:  # terminal now: tell their owners' webhooks
            notify_terminal(self.ctx.factory, self.ctx.settings, job_id)
        for job_id in queued:
            self.submit(job_id)
        if queued or orphans:
            log.info("embedded worker: re-queued %d job(s), failed %d interrupted job(s)", len(queued), len(orphans))

    def _loop(self) -> None:
        while True:
            kind, job_id = self._queue.get()
            if kind == "stop":
                return
            try:
                (run_prune if kind == "prune" else run_measure)(self.ctx, job_id)
            except Exception:  # run_* already records failures; this keeps the thread alive regardless
                log.exception("embedded worker: %s of job %s crashed", kind, job_id)
