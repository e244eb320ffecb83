"""Settings read HWPRUNE_* and refuse unsafe defaults outside development."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hwprune.settings import Settings


def test_env_prefix_and_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HWPRUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HWPRUNE_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.delenv("HWPRUNE_BROKER_URL", raising=False)
    monkeypatch.delenv("HWPRUNE_DATABASE_URL", raising=False)
    s = Settings()
    assert s.max_upload_bytes == 1234 and s.embedded and s.is_sqlite
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'hwprune.db').resolve()}"
    assert s.visibility_timeout_s > s.job_hard_time_limit_s > s.job_soft_time_limit_s


def test_production_refuses_unsafe_defaults() -> None:
    with pytest.raises(ValidationError) as e:
        Settings(env="production")
    msg = str(e.value)
    assert "HWPRUNE_DATABASE_URL" in msg and "HWPRUNE_BROKER_URL" in msg and "HWPRUNE_CORS_ORIGINS" in msg
    ok = Settings(env="production", database_url="postgresql+psycopg://u@db/h", broker_url="redis://r:6379/0",
                  cors_origins=["https://dash.example"])
    assert not ok.embedded and not ok.is_sqlite


def test_time_limits_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="hard time limit"):
        Settings(job_soft_time_limit_s=100, job_hard_time_limit_s=50)
