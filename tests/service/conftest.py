"""Fixtures for the service tests: a fresh PostgreSQL database per session (dropped afterwards), a dedicated
Redis db number (flushed), SQLite files in tmp dirs, a tiny conv net exported to ONNX, and helpers that start
`hwprune serve` / `hwprune worker` as real subprocesses."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from torch import nn

from api.app import create_app
from api.dispatch import CeleryDispatcher
from db.keys import create_key
from db.migrate import upgrade
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 13  # dedicated to these tests; flushed before and after


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def fresh_pg_database(tag: str) -> str:
    name = f"hwprune_test_{tag}_{secrets.token_hex(4)}"
    _admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
           f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    _admin(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    name = fresh_pg_database("s")
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    yield url
    drop_pg_database(name)


@pytest.fixture()
def empty_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with no schema at all (for migration tests)."""
    name = fresh_pg_database("m")
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    drop_pg_database(name)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()


def make_tiny_onnx(path: Path, channels: int = 16, size: int = 16) -> Path:
    """A real (small) conv net: two convs + linear head, exported with the TorchScript-based exporter for
    `size` x `size` inputs."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    ).eval()
    torch.onnx.export(m, (torch.randn(1, 3, size, size),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"])
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


def add_key(database_url: str, tenant: str) -> str:
    engine = make_engine(database_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            return create_key(s, tenant)[1]
    finally:
        engine.dispose()


@dataclass
class ApiHarness:
    client: TestClient
    settings: Settings
    key_a: str
    key_b: str

    def h(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key_a}"}


@pytest.fixture()
def api(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[ApiHarness]:
    """The real app on PostgreSQL, enqueueing to real Redis (no worker consumes in API-only tests)."""
    settings = Settings(database_url=pg_url, broker_url=redis_url, data_dir=tmp_path / "data",
                        max_upload_bytes=256 * 1024, max_dataset_bytes=256 * 1024)
    app = create_app(settings, CeleryDispatcher(redis_url, settings.visibility_timeout_s))
    tag = secrets.token_hex(3)
    with TestClient(app) as client:
        yield ApiHarness(client, settings, add_key(pg_url, f"a-{tag}"), add_key(pg_url, f"b-{tag}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(**values: str) -> dict[str, str]:
    """The environment for a subprocess: ours, minus any HWPRUNE_* the developer has set, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HWPRUNE_")}
    env.update({f"HWPRUNE_{k.upper()}": v for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: keep the worker from oversubscribing
    return env


class Proc:
    """A `hwprune ...` subprocess whose output goes to a log file we can read while it runs."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", "hwprune.cli", *args], env=env, cwd=cwd,
                                  stdout=self._fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            if self.p.poll() is not None:
                raise AssertionError(f"process exited with {self.p.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._fh.close()


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def poll_job(client: httpx.Client | TestClient, job_id: str, headers: dict[str, str], timeout: float,
             until: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in until:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout} s: {job}")
