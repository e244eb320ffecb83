"""Celery tasks: thin wrappers that carry only a job id and call the shared task code in worker/runner.py."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_process_init
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from db.artifacts import ArtifactStore
from db.jobs import MEASURE_QUEUE, MEASURE_TASK, PRUNE_TASK, finish
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import get_settings
from worker.celery_app import celery_app
from worker.runner import TaskContext, run_measure, run_prune

log = logging.getLogger("hwprune.worker")


@lru_cache(maxsize=1)
def _context() -> TaskContext:
    """Built lazily in each pool process (after fork), so no database connection crosses a fork."""
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url, pool_size=2, max_overflow=2) \
        if not settings.is_sqlite else make_engine(settings.resolved_database_url)
    return TaskContext(
        factory=make_session_factory(engine), store=ArtifactStore(settings.data_dir), settings=settings,
        enqueue_measure=lambda job_id: measure_task.apply_async(args=[job_id], queue=MEASURE_QUEUE),
    )


class JobTask(Task):
    """Records a reason when Celery itself ends a task: on a hard time limit the pool process is killed and
    this hook runs in the worker's main process, where nothing else would tell the row."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        settings = get_settings()
        # NullPool: the main process forks new pool processes later, so it must keep no open connections.
        engine = create_engine(settings.resolved_database_url, poolclass=NullPool)
        try:
            with transaction(make_session_factory(engine)) as s:
                finish(s, str(args[0]), "failed", error=f"the job exceeded its hard time limit of {exc} s and was "
                                                        "stopped; lower steps or use a smaller model")
        finally:
            engine.dispose()
        log.warning("job %s: hard time limit, marked failed", args[0])


@worker_process_init.connect
def _preload(**_: Any) -> None:
    """Import the pipeline (torch, onnx, onnxruntime, ...) when a pool process starts, not when its first job
    arrives: submission-to-pickup time then holds no seconds of imports, and neither does the first job's
    heartbeat window (pruning_core.pipeline.warm_imports)."""
    from pruning_core.pipeline import pick_device, warm_imports

    warm_imports()
    _context()
    log.info("pool process ready; pruning runs on %s", pick_device())


@celery_app.task(base=JobTask, name=PRUNE_TASK, soft_time_limit=get_settings().job_soft_time_limit_s,
                 time_limit=get_settings().job_hard_time_limit_s)
def prune_task(job_id: str) -> None:
    run_prune(_context(), job_id)


@celery_app.task(base=JobTask, name=MEASURE_TASK, soft_time_limit=get_settings().measure_time_limit_s,
                 time_limit=get_settings().measure_time_limit_s + 60)
def measure_task(job_id: str) -> None:
    run_measure(_context(), job_id)
