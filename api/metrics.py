"""Prometheus `/metrics`: jobs by state, job durations, queue depth.

Every number is read from the database (and the Redis broker, when there is one) at scrape time by a custom
collector, not counted in process memory: with Celery the jobs run in other processes, and several API
replicas must all report the same totals. The endpoint has no auth (Prometheus convention); it shows counts
only, no tenant names or ids. Restrict it at the proxy, or turn it off with `HWPRUNE_METRICS_ENABLED=false`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.jobs import MEASURE_QUEUE, PRUNE_QUEUE
from db.models import JOB_STATUSES, TERMINAL_STATUSES, Job

log = logging.getLogger("hwprune.metrics")
# Job wall times range from seconds (tiny test models) to hours (SMART on a ResNet): log-spaced buckets.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # SQLite returns naive UTC


class ServiceCollector(Collector):
    def __init__(self, factory: sessionmaker[Session], broker_url: str | None) -> None:
        self.factory, self.broker_url = factory, broker_url

    def collect(self) -> Iterator[Metric]:
        with self.factory() as s:
            counts: dict[str, int] = {st: n for st, n in s.execute(
                select(Job.status, func.count()).group_by(Job.status)).all()}
            waiting_measure = s.scalar(select(func.count()).where(Job.status == "running",
                                                                  Job.phase == "measure_queued")) or 0
            spans = s.execute(select(Job.status, Job.started_at, Job.finished_at).where(
                Job.status.in_(TERMINAL_STATUSES), Job.started_at.is_not(None),
                Job.finished_at.is_not(None))).all()
        jobs = GaugeMetricFamily("hwprune_jobs", "Jobs by state (all tenants)", labels=["state"])
        for st in JOB_STATUSES:
            jobs.add_metric([st], float(counts.get(st, 0)))
        yield jobs

        depth = GaugeMetricFamily("hwprune_queue_depth", "Jobs waiting for a worker, by stage "
                                  "(prune: queued; measure: pruned, waiting for latency measurement)",
                                  labels=["queue"])
        depth.add_metric(["prune"], float(counts.get("queued", 0)))
        depth.add_metric(["measure"], float(waiting_measure))
        yield depth

        hist = HistogramMetricFamily("hwprune_job_duration_seconds", "Wall time from start to terminal state "
                                     "of finished jobs", labels=["status"])
        for st in sorted(TERMINAL_STATUSES):
            secs = [max((_utc(f) - _utc(a)).total_seconds(), 0.0) for s_, a, f in spans
                    if s_ == st and a is not None and f is not None]
            buckets = [(repr(b), float(sum(1 for x in secs if x <= b))) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", float(len(secs))))
            hist.add_metric([st], buckets, sum_value=sum(secs))
        yield hist

        if self.broker_url and self.broker_url.startswith("redis"):
            yield from self._broker()

    def _broker(self) -> Iterator[Metric]:
        """Messages sitting in the Redis lists Celery uses as queues (one list per queue name)."""
        import redis

        g = GaugeMetricFamily("hwprune_broker_queue_length", "Messages in the Celery broker queue",
                              labels=["queue"])
        try:
            client = redis.Redis.from_url(self.broker_url or "", socket_timeout=2, socket_connect_timeout=2)
            try:
                for q in (PRUNE_QUEUE, MEASURE_QUEUE):
                    g.add_metric([q], float(client.llen(q)))
            finally:
                client.close()
        except redis.RedisError as e:
            log.warning("metrics: broker unreachable: %s", e)
            return
        yield g


def make_router(factory: sessionmaker[Session], broker_url: str | None) -> APIRouter:
    """One registry per app (not the process-global one), so several apps in one process do not collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(factory, broker_url))
    router = APIRouter(tags=["health"])

    @router.get("/metrics", summary="Prometheus metrics (no auth)", response_class=Response)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
