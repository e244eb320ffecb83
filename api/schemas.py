"""Request and response bodies of the v1 HTTP contract (see DESIGN.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator
from sqlalchemy import Row

from db.models import DatasetRecord, Job, ModelRecord

T = TypeVar("T")
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def _utc(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; they were written in UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class _Out(BaseModel):
    @field_serializer("*", when_used="json")
    def _dates(self, v: Any) -> Any:
        return _utc(v).isoformat() if isinstance(v, datetime) else v  # type: ignore[union-attr]


class TensorOut(BaseModel):
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelOut(_Out):
    id: str
    name: str
    format: str
    opset: int | None
    inputs: list[TensorOut]
    outputs: list[TensorOut]
    params: int
    macs: int
    input_shape: list[int] | None
    sha256: str
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, m: ModelRecord) -> ModelOut:
        return cls.model_validate(m, from_attributes=True)


class DatasetOut(_Out):
    id: str
    name: str
    samples: int
    has_labels: bool
    input_shape: list[int]
    sha256: str
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, d: DatasetRecord) -> DatasetOut:
        return cls.model_validate(d, from_attributes=True)


class AcceleratorOut(BaseModel):
    name: str
    block_shape: list[int] | None
    nm: list[int] | None
    channel_multiple: int
    default_granularity: str
    description: str


class InlineAccelerator(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    block_shape: list[int] | None = Field(default=None, min_length=2, max_length=2)
    nm: list[int] | None = Field(default=None, min_length=2, max_length=2)
    channel_multiple: int | None = None
    default_granularity: str | None = None


class JobRequest(BaseModel):
    """Everything but the ids is a `PruneSpec` field; unset fields keep PruneSpec's defaults. Further
    PruneSpec fields (batch_size, lr, schedule, allocation, min_keep, layers, latency_seconds, ...) are
    accepted as extra keys and validated by `PruneSpec.from_dict`, which names any unknown field."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {
        "model_id": "0190c1f2a3b4c5d6e7f8a9b0c1d2e3f4", "method": "magnitude", "granularity": "channel",
        "accelerator": "cpu", "target_sparsity": 0.5, "steps": 50, "seed": 0}})
    model_id: str
    dataset_id: str | None = None
    method: Literal["smart", "magnitude", "3d"] = "smart"
    granularity: Literal["block", "channel", "nm"] | None = None
    accelerator: str | InlineAccelerator = Field(default="cpu", description="a built-in profile name "
                                                 "(GET /v1/accelerators) or an inline profile")
    target_sparsity: float | None = Field(default=None, gt=0, lt=1)
    flops_target: float | None = Field(default=None, gt=0, lt=1, description="3d: kept fraction of FLOPs")
    steps: int | None = Field(default=None, ge=0)
    seed: int | None = None
    input_shape: list[int] | None = None
    callback_url: str | None = Field(default=None, max_length=2048, description="http(s) URL POSTed the job "
                                     "summary on a terminal state, signed with HMAC-SHA256 (docs/dashboard.md)")
    callback_secret: str | None = Field(default=None, min_length=16, max_length=256, description="per-job "
                                        "HMAC key; default: the server's HWPRUNE_WEBHOOK_SECRET")

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            u = urlsplit(v)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError("callback_url must be an absolute http:// or https:// URL")
        return v

    def spec_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_unset=True,
                            exclude={"model_id", "dataset_id", "callback_url", "callback_secret"})
        if isinstance(self.accelerator, InlineAccelerator):
            d["accelerator"] = self.accelerator.model_dump(exclude_none=True)
        return {k: v for k, v in d.items() if v is not None}


class JobOut(_Out):
    id: str
    status: JobStatus
    progress: float
    stage: str | None
    metrics: dict[str, Any] | None = Field(
        description="while running: the last progress metrics; when succeeded: speedup, achieved_sparsity, "
        "latency medians and fidelity copied from the report")
    error: str | None
    model_id: str
    dataset_id: str | None
    method: str
    granularity: str
    accelerator: Any
    spec: dict[str, Any]
    cancel_requested: bool
    speedup: float | None
    achieved_sparsity: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifacts: dict[str, str] | None = Field(description="download links, present once the job succeeded")
    callback_url: str | None = None

    @classmethod
    def of(cls, j: Job | Row[Any]) -> JobOut:
        """From the ORM object or a Core row of the jobs table (db.repositories.read_owned)."""
        arts = None
        if j.status == "succeeded":
            arts = {n: f"/v1/jobs/{j.id}/artifacts/{n}" for n in ("model.onnx", "report.json")}
        return cls(
            id=j.id, status=j.status, progress=j.progress, stage=j.stage,  # type: ignore[arg-type]
            metrics=j.metrics if j.metrics is not None else j.progress_metrics, error=j.error,
            model_id=j.model_id, dataset_id=j.dataset_id, method=j.method, granularity=j.granularity,
            accelerator=j.accelerator, spec=j.spec, cancel_requested=j.cancel_requested, speedup=j.speedup,
            achieved_sparsity=j.achieved_sparsity, created_at=j.created_at, started_at=j.started_at,
            finished_at=j.finished_at, artifacts=arts, callback_url=j.callback_url,
        )


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(description="pass as `cursor` to get the next page; null on the last page")
