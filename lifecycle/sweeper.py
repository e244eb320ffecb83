"""Nothing lost: the job row is the truth, the broker only a delivery channel that can forget (issue 7).

Two failure modes Celery's own redelivery does not cover:
- Redis restarted without persistence (or a message dropped): the row is `queued` (or `running` in phase
  `measure_queued`) but no message for it exists any more. `Sweeper` sends it again once it has been missing
  from the broker for `requeue_grace_s`.
- A whole worker host vanished (SIGKILL of the main process, machine lost): its unacked message comes back only
  after the Redis visibility timeout (hours), and `db.jobs._take_over` only recognises dead processes on the
  same host. `Heartbeat` (a thread beside every running stage) writes `heartbeat_at` every
  `heartbeat_interval_s`; a running job whose heartbeat is older than `heartbeat_stale_s` is re-queued
  (prune -> `queued`, measure -> `measure_queued`) while it has had fewer than `max_attempts` runs, else
  `failed` with the reason. A job whose worker is gone therefore leaves `running` within about
  `heartbeat_stale_s + sweep_interval_s`.

Where it runs: a daemon thread in the API process (`hwprune serve` with a broker; `api/app.py` starts it when
`sweep_interval_s > 0`); with `serve --workers N`, in the supervising process only. Several `serve` replicas
may each sweep: every transition is an UPDATE guarded on the state it saw (a re-send also on the row's
`updated_at`), so only one sweeper acts on a row, and a duplicate message that slips through anyway is skipped
by the row lock in `db.jobs.claim_*` (one no-op task).
The embedded worker has no broker to lose messages and recovers on start instead (worker/embedded.py).

Broker presence is read from Redis directly (kombu's Redis transport keeps a queue as a list named after it
and reserved-but-unacked messages in the `unacked` hash); for other brokers every candidate counts as missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as rows
from db.jobs import MEASURE_QUEUE, MEASURE_TASK, PRUNE_QUEUE, PRUNE_TASK
from db.models import Job, utcnow
from db.session import transaction
from hwprune.settings import Settings
from lifecycle.webhooks import notify_terminal

log = logging.getLogger("hwprune.sweeper")
Send = Callable[[str, str, str], None]  # (task name, queue, job id)


class Heartbeat:
    """`with Heartbeat(...):` around a running stage: a daemon thread writes `heartbeat_at` every `interval` s.

    A thread rather than the progress callback, so a long stage that reports no progress (an export, one big
    latency run) is not mistaken for a dead worker. It dies with its process, which is the point."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, worker: str, interval: float) -> None:
        assert interval > 0, "heartbeat interval must be positive"
        self.factory, self.job_id, self.worker, self.interval = factory, job_id, worker, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)
        self.beats = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with transaction(self.factory) as s:
                    if not rows.beat(s, self.job_id, self.worker):
                        return  # finished, cancelled or taken over: nothing left to vouch for
                self.beats += 1
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.interval + 5)


def redis_job_ids(redis_url: str, queues: Iterable[str], candidates: Iterable[str]) -> set[str]:
    """Which of `candidates` have a message in the broker: waiting in one of `queues` (kombu also keeps
    priority sub-lists named `<queue>\\x06\\x16<n>`) or delivered but not yet acknowledged."""
    import redis

    wanted = set(candidates)
    if not wanted:
        return set()
    r = redis.Redis.from_url(redis_url)
    try:
        blobs: list[Any] = []
        for q in queues:
            for key in [q.encode(), *r.scan_iter(match=f"{q}\x06\x16*")]:
                if r.type(key) == b"list":
                    blobs.extend(r.lrange(key, 0, -1))
        blobs.extend(r.hvals("unacked"))
    finally:
        r.close()
    # Message headers carry `argsrepr` ("['<job id>']"); ids are 32 random hex chars, so substring is exact.
    blob = b"\n".join(b if isinstance(b, bytes) else str(b).encode() for b in blobs)
    return {j for j in wanted if j.encode() in blob}


@dataclass
class SweepResult:
    resent: list[str] = field(default_factory=list)  # queued/measure_queued jobs missing from the broker
    requeued: list[str] = field(default_factory=list)  # running jobs with a stale heartbeat, sent again
    failed: list[str] = field(default_factory=list)  # stale and out of attempts


class Sweeper:
    def __init__(self, factory: sessionmaker[Session], settings: Settings, send: Send,
                 in_broker: Callable[[Iterable[str], Iterable[str]], set[str]] | None = None) -> None:
        self.factory, self.settings, self.send = factory, settings, send
        if in_broker is None and settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
            url = settings.broker_url

            def in_broker(queues: Iterable[str], ids: Iterable[str]) -> set[str]:
                return redis_job_ids(url, queues, ids)
        self.in_broker = in_broker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweeps = 0

    # --- one pass -------------------------------------------------------------------------------------------
    def sweep(self) -> SweepResult:
        out = SweepResult()
        now = utcnow()
        grace = now - timedelta(seconds=self.settings.requeue_grace_s)
        stale = now - timedelta(seconds=self.settings.heartbeat_stale_s)
        with self.factory() as s:
            waiting = s.execute(select(Job.id, Job.status, Job.updated_at).where(
                Job.updated_at < grace,
                or_(Job.status == "queued", (Job.status == "running") & (Job.phase == "measure_queued")),
            )).all()
            silent = s.execute(select(Job.id, Job.phase, Job.attempts, Job.worker).where(
                Job.status == "running", Job.phase.in_(("prune", "measure")),
                or_(Job.heartbeat_at < stale, Job.heartbeat_at.is_(None) & (Job.updated_at < stale)),
            )).all()
        self._resend_missing(waiting, out)
        for job_id, phase, attempts, worker in silent:
            self._recover(job_id, phase, attempts, worker, out)
        for job_id in out.failed:  # terminal now: the owner's webhook must hear about it like any other failure
            notify_terminal(self.factory, self.settings, job_id)
        self.sweeps += 1
        if out.resent or out.requeued or out.failed:
            log.warning("sweep: resent %d missing, re-queued %d stale, failed %d stale", len(out.resent),
                        len(out.requeued), len(out.failed))
        return out

    def _resend_missing(self, waiting: Sequence[Any], out: SweepResult) -> None:
        seen = {j: at for j, _, at in waiting}
        prune_ids = [j for j, st, _ in waiting if st == "queued"]
        measure_ids = [j for j, st, _ in waiting if st == "running"]
        present: set[str] = set()
        if self.in_broker is not None:
            present = self.in_broker((PRUNE_QUEUE, MEASURE_QUEUE), prune_ids + measure_ids)
        for ids, status, task, queue in ((prune_ids, "queued", PRUNE_TASK, PRUNE_QUEUE),
                                         (measure_ids, "running", MEASURE_TASK, MEASURE_QUEUE)):
            for job_id in ids:
                if job_id in present:
                    continue
                # Touch updated_at first, guarded on the state and the updated_at we saw: the next sweep waits a
                # full grace, and of several sweepers that saw the same row only the first one sends.
                with transaction(self.factory) as s:
                    expect = Job.status == status if status == "queued" else \
                        (Job.status == "running") & (Job.phase == "measure_queued")
                    res = s.execute(update(Job).where(Job.id == job_id, expect, Job.updated_at == seen[job_id])
                                    .values(updated_at=utcnow()))
                    if res.rowcount != 1:  # type: ignore[attr-defined]
                        continue
                self.send(task, queue, job_id)
                out.resent.append(job_id)

    def _recover(self, job_id: str, phase: str | None, attempts: int, worker: str | None, out: SweepResult) -> None:
        silent_for = int(self.settings.heartbeat_stale_s)
        expect = (Job.status == "running") & (Job.phase == phase) & (Job.attempts == attempts)
        with transaction(self.factory) as s:
            if attempts >= self.settings.max_attempts:
                res = s.execute(update(Job).where(Job.id == job_id, expect).values(
                    status="failed", finished_at=utcnow(), updated_at=utcnow(),
                    error=f"its worker stopped responding (no heartbeat for over {silent_for} s) on each of "
                          f"{attempts} attempts; submit it again, with fewer steps or a smaller model if it "
                          "keeps happening"))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    out.failed.append(job_id)
                return
            if phase == "prune":
                values: dict[str, Any] = dict(status="queued", phase=None, worker=None, progress=0.0,
                                              stage="requeued: worker lost")
                task, queue = PRUNE_TASK, PRUNE_QUEUE
            else:  # measure: the pruned model is on disk; only the measurement is repeated
                values = dict(phase="measure_queued", worker=None, attempts=attempts + 1,
                              stage="requeued: worker lost")
                task, queue = MEASURE_TASK, MEASURE_QUEUE
            res = s.execute(update(Job).where(Job.id == job_id, expect).values(updated_at=utcnow(), **values))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return
        log.warning("job %s: worker %s silent for over %d s; re-queued (%s)", job_id, worker, silent_for, phase)
        self.send(task, queue, job_id)
        out.requeued.append(job_id)

    # --- background thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        assert self.settings.sweep_interval_s > 0, "sweep_interval_s=0 switches the sweeper off"
        self._thread = threading.Thread(target=self._loop, name="hwprune-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval_s):
            try:
                self.sweep()
            except Exception:  # database or broker down: try again next round
                log.warning("sweep failed; retrying in %.0f s", self.settings.sweep_interval_s, exc_info=True)
