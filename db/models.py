"""SQLAlchemy 2.0 models: tenants, API keys, uploaded models and datasets, jobs.

The schema is created only by Alembic (`migrations/`); `tests/service/test_migrations.py` checks that these
models and the migrations agree. Every tenant-owned table carries `tenant_id` so each query can be scoped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.ids import new_id

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Which half of a running job owns it: pruning on the gpu queue, then latency on the cpu queue.
JOB_PHASES = ("prune", "measure_queued", "measure", "done")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _id() -> Mapped[str]:
    return mapped_column(String(32), primary_key=True, default=new_id)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = _id()
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    created_at: Mapped[datetime] = _created()


class ApiKey(Base):
    """Only the sha256 of the secret is stored; `prefix` finds the row, the hash is compared in constant time."""

    __tablename__ = "api_keys"
    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False, unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelRecord(Base):
    __tablename__ = "models"
    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(256), nullable=False)
    format: Mapped[str] = mapped_column(String(16), nullable=False)  # "onnx" | "torchscript"
    opset: Mapped[int | None] = mapped_column(Integer, nullable=True)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    params: Mapped[int] = mapped_column(BigInteger, nullable=False)
    macs: Mapped[int] = mapped_column(BigInteger, nullable=False)
    input_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _created()


class DatasetRecord(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(256), nullable=False)
    samples: Mapped[int] = mapped_column(Integer, nullable=False)
    has_labels: Mapped[bool] = mapped_column(Boolean, nullable=False)
    input_shape: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _created()


class Job(Base):
    """A job row is a state machine: queued -> running -> succeeded | failed | cancelled (see db/jobs.py)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("status IN ('queued','running','succeeded','failed','cancelled')", name="status"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        Index("uq_jobs_tenant_idempotency", "tenant_id", "idempotency_key", unique=True),  # one job per key
    )
    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True)
    method: Mapped[str] = mapped_column(String(16), nullable=False)
    granularity: Mapped[str] = mapped_column(String(16), nullable=False)
    accelerator: Mapped[Any] = mapped_column(JSON, nullable=False)  # profile name or inline dict
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # PruneSpec.to_dict(): replayable
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    progress_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # summary copied from the report
    speedup: Mapped[float | None] = mapped_column(Float, nullable=True)
    achieved_sparsity: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # webhook on a terminal state
    callback_secret: Mapped[str | None] = mapped_column(String(256), nullable=True)  # per-job HMAC key (optional)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    worker: Mapped[str | None] = mapped_column(String(256), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # lifecycle/sweeper.py: a running job whose heartbeat is stale lost its worker (written by worker/runner.py).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Idempotency-Key of the submission and the sha256 of its body: a retry returns the same job.
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class WebhookDelivery(Base):
    """One row per delivery attempt (lifecycle/webhooks.py), so a user can see why a callback did not arrive."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False, index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    event: Mapped[str] = mapped_column(String(32), nullable=False)  # "job.succeeded" | "job.failed" | ...
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)  # 1-based
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no HTTP response
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = _created()
