"""Service CLI as a user runs it: `db upgrade` on an empty PostgreSQL database, `keys create`, and the
refusals that say what to do (no broker for `worker`, schema not at head for `serve`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from db.keys import verify_key
from db.migrate import current_revision, head_revision
from db.session import make_engine, make_session_factory
from hwprune.settings import Settings
from tests.service.conftest import service_env
from worker.celery_app import make_celery


def hw(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwprune.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.services
def test_db_upgrade_then_keys_create_on_postgres(empty_pg_url: str, tmp_path: Path) -> None:
    env = service_env(database_url=empty_pg_url, broker_url="redis://127.0.0.1:6379/13")
    refused = hw(["serve", "--port", "1"], env, tmp_path)
    assert refused.returncode == 2 and "hwprune db upgrade" in refused.stderr, refused.stderr
    up = hw(["db", "upgrade"], env, tmp_path)
    assert up.returncode == 0, up.stderr
    engine = make_engine(empty_pg_url)
    try:
        assert current_revision(engine) == head_revision(empty_pg_url)
        out = hw(["keys", "create", "--tenant", "acme"], env, tmp_path)
        assert out.returncode == 0, out.stderr
        key = out.stdout.strip().splitlines()[-1]
        with make_session_factory(engine)() as s:
            tenant = verify_key(s, key)
            assert tenant is not None and tenant.name == "acme"
            assert verify_key(s, key[:-2] + "zz") is None
    finally:
        engine.dispose()


def test_worker_without_broker_explains(tmp_path: Path) -> None:
    r = hw(["worker"], service_env(data_dir=str(tmp_path)), tmp_path)
    assert r.returncode == 2 and "HWPRUNE_BROKER_URL" in r.stderr


def test_celery_reliability_settings() -> None:
    s = Settings(broker_url="redis://127.0.0.1:6379/13", job_soft_time_limit_s=100, job_hard_time_limit_s=120)
    conf = make_celery(s).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > s.job_hard_time_limit_s
    assert conf.task_routes["hwprune.prune"]["queue"] == "gpu" and conf.task_routes["hwprune.measure"]["queue"] == "cpu"
