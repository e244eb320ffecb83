"""The Celery app for `hwprune worker` (and `celery -A worker.celery_app worker`).

Reliability settings (Onyx / Celery docs): acks_late + reject_on_worker_lost so a job whose worker dies is
redelivered (the row lock in db/jobs.py keeps a redelivered message from running it twice), prefetch 1 so a
long job never holds other jobs hostage, a Redis visibility timeout longer than the hard time limit so Redis
does not redeliver a job that is merely slow, and no result backend (the job row is the result).
"""

from __future__ import annotations

from celery import Celery

from db.jobs import MEASURE_QUEUE, MEASURE_TASK, PRUNE_QUEUE, PRUNE_TASK
from hwprune.settings import Settings, get_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("hwprune", broker=settings.broker_url or "redis://127.0.0.1:6379/0", include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_routes={PRUNE_TASK: {"queue": PRUNE_QUEUE}, MEASURE_TASK: {"queue": MEASURE_QUEUE}},
        task_default_queue=MEASURE_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_proc_alive_timeout=120,  # pool processes import torch at start (worker/tasks.py _preload)
    )
    return app


celery_app = make_celery(get_settings())
