"""docker-compose.yml: the services the design names, wired to one artifact volume, with settings that pass
the production checks (no Docker engine here; `docker-compose config` was run by hand, see docs/service.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hwprune.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_volumes_and_order() -> None:
    svc = _compose()["services"]
    assert set(svc) == {"redis", "postgres", "migrate", "api", "worker-gpu", "worker-cpu"}
    assert svc["migrate"]["command"] == ["hwprune", "db", "upgrade"]
    for name in ("api", "worker-gpu", "worker-cpu"):
        s = svc[name]
        assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
        assert "artifacts:/data" in s["volumes"] and s["environment"]["HWPRUNE_DATA_DIR"] == "/data", name
        assert "healthcheck" in s, name
    for name in ("redis", "postgres"):
        assert "healthcheck" in svc[name]
    assert svc["worker-gpu"]["command"][:4] == ["hwprune", "worker", "--queues", "gpu"]
    assert svc["worker-cpu"]["command"][:4] == ["hwprune", "worker", "--queues", "cpu"]
    gpu = svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert svc["worker-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for f in ("docker/Dockerfile", "docker/Dockerfile.gpu"):
        assert (ROOT / f).is_file()


def test_compose_settings_pass_the_production_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(_compose()["services"]["api"]["environment"])
    for k, v in env.items():  # read the way the containers read them: from the environment
        monkeypatch.setenv(k, v.replace("${POSTGRES_PASSWORD:-hwprune}", "pw"))
    s = Settings()
    assert s.env == "production" and not s.embedded and not s.is_sqlite
    assert s.cors_origins == ["http://localhost:8000"] and s.data_dir == Path("/data")
