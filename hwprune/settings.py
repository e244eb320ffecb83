"""Service settings: one pydantic-settings class, every field overridable as `HWPRUNE_<FIELD>`.

Style anchor: full-stack-fastapi-template -- a single settings object that refuses unsafe defaults outside
development (a production deployment must name its database, broker and CORS origins explicitly).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HWPRUNE_", env_file=None, extra="ignore")

    env: Literal["development", "production"] = "development"
    # Where the embedded default keeps its SQLite file and every artifact (uploads, pruned models, reports).
    data_dir: Path = Path(".hwprune")
    # None: SQLite file `<data_dir>/hwprune.db` (embedded default). PostgreSQL: postgresql+psycopg://user@host/db
    database_url: str | None = None
    # None: no Celery; `serve` runs jobs in its own worker thread. Set: `serve` is API only, `worker` consumes.
    broker_url: str | None = None
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)  # models: 2 GiB
    max_dataset_bytes: int = Field(default=1024**3, gt=0)  # npz datasets: 1 GiB
    job_soft_time_limit_s: int = Field(default=4 * 3600, gt=0)  # Celery raises SoftTimeLimitExceeded -> failed
    job_hard_time_limit_s: int = Field(default=4 * 3600 + 300, gt=0)  # the worker process is killed
    measure_time_limit_s: int = Field(default=1800, gt=0)  # latency measurement on the cpu queue
    progress_interval_s: float = Field(default=0.5, ge=0.0)  # at most one progress write per interval
    cancel_poll_interval_s: float = Field(default=0.5, ge=0.0)  # how often a running job re-reads its flag
    sse_poll_interval_s: float = Field(default=0.25, gt=0.0)  # how often the SSE stream re-reads the row
    cors_origins: list[str] = Field(default_factory=lambda: ["*"])
    # Webhooks (lifecycle/webhooks.py): HMAC key for jobs submitted without their own `callback_secret`.
    webhook_secret: str | None = None
    webhook_timeout_s: float = Field(default=10.0, gt=0.0)  # per attempt (connect + response)
    webhook_max_attempts: int = Field(default=5, ge=1)  # first try + retries
    webhook_backoff_s: float = Field(default=2.0, ge=0.0)  # wait before retry k: backoff * 2**(k-1)
    metrics_enabled: bool = True  # expose Prometheus `/metrics` (no auth: restrict it at the proxy)
    page_limit_max: int = 200
    embedded_workers: int = Field(default=1, ge=1)  # worker threads `serve` starts without a broker
    # Reliability (lifecycle/sweeper.py): a running job's worker writes `heartbeat_at` every heartbeat_interval_s;
    # with a broker, `serve` sweeps every sweep_interval_s (0 = off): queued jobs missing from the broker for
    # requeue_grace_s are sent again, running jobs silent for heartbeat_stale_s are re-queued (up to
    # max_attempts runs in all) or failed.
    heartbeat_interval_s: float = Field(default=10.0, gt=0.0)
    heartbeat_stale_s: float = Field(default=120.0, gt=0.0)  # must exceed heartbeat_interval_s several times
    sweep_interval_s: float = Field(default=30.0, ge=0.0)
    requeue_grace_s: float = Field(default=60.0, ge=0.0)
    max_attempts: int = Field(default=3, ge=1)
    # How long a client should wait before retrying when the database is unreachable (503 Retry-After).
    retry_after_s: int = Field(default=5, ge=1)
    # API hot path (docs/service.md, "Performance"). A verified API key is remembered for auth_cache_s seconds
    # (0 = check the database on every request), keyed by its sha256, at most auth_cache_size keys per process:
    # a revoked key is refused at the latest auth_cache_s after the revocation.
    auth_cache_s: float = Field(default=5.0, ge=0.0)
    auth_cache_size: int = Field(default=1024, ge=1)
    # The API pings a pooled PostgreSQL connection only when it sat unused for longer than this (db/session.py).
    db_ping_idle_s: float = Field(default=2.0, ge=0.0)
    # API processes `hwprune serve` runs (uvicorn workers); more than 1 needs a broker (the embedded worker
    # lives inside the single API process). The sweeper then runs once, in the supervising process.
    api_workers: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        assert self.job_hard_time_limit_s > self.job_soft_time_limit_s, "hard time limit must exceed the soft one"
        assert self.heartbeat_stale_s > 2 * self.heartbeat_interval_s, "heartbeat_stale_s must exceed two heartbeats"
        if self.api_workers > 1 and self.embedded:
            raise ValueError("HWPRUNE_API_WORKERS > 1 needs HWPRUNE_BROKER_URL: the embedded worker runs inside "
                             "the one API process")
        if self.env == "production":
            problems = []
            if not self.database_url or self.database_url.startswith("sqlite"):
                problems.append("HWPRUNE_DATABASE_URL must name a PostgreSQL database")
            if not self.broker_url:
                problems.append("HWPRUNE_BROKER_URL must name a Redis broker")
            if "*" in self.cors_origins:
                problems.append("HWPRUNE_CORS_ORIGINS must list the allowed origins, not '*'")
            if problems:
                raise ValueError("unsafe settings for env=production: " + "; ".join(problems))
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'hwprune.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """No broker: the API process runs jobs itself."""
        return not self.broker_url

    @property
    def visibility_timeout_s(self) -> int:
        """Redis re-delivers unacked messages after this; it must outlast the longest job (acks_late)."""
        return max(self.job_hard_time_limit_s, self.measure_time_limit_s) + 600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
