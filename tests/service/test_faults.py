"""Faults (issue 7): nothing lost, nothing left `running`, nothing run twice, and the API degrades to 503.

Every broker and database that these tests break is their own: a redis-server on a free port and a throwaway
PostgreSQL cluster in a tmp dir. The machine's shared Redis and PostgreSQL are never restarted (other tests
run against them); the shared PostgreSQL only hosts a fresh database per module, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.dispatch import CeleryDispatcher
from db.migrate import upgrade
from db.models import Job
from db.session import make_engine, make_session_factory
from hwprune.settings import Settings
from tests.service.conftest import (
    ApiHarness,
    Proc,
    add_key,
    drop_pg_database,
    free_port,
    fresh_pg_database,
    make_tiny_onnx,
    poll_job,
    service_env,
    wait_http,
)
from tests.service.jobspecs import QUICK

# Long enough in the prune stage to be killed in the middle (smart fine-tuning steps), short enough to rerun.
LONG = {**QUICK, "method": "smart", "steps": 800, "batch_size": 8}
# Fault timings: a dead worker's job leaves `running` within heartbeat_stale_s + sweep_interval_s (~5 s).
FAST_SWEEP = {"heartbeat_interval_s": "1", "heartbeat_stale_s": "4", "sweep_interval_s": "1",
              "requeue_grace_s": "2", "max_attempts": "2", "progress_interval_s": "0.2"}


# --- brokers and databases of our own ---------------------------------------------------------------------

class OwnRedis:
    """A redis-server on its own port with no persistence, like a restarted production Redis without AOF."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (apt-get install redis-server)"
        self.p = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(self.workdir)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"own redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            self.p.wait(20)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class OwnPostgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl as the postgres user) we may stop and start at will."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        assert bins, "PostgreSQL server binaries not found under /usr/lib/postgresql"
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="hwprune-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                           "--auth=trust", "-E", "UTF8"])

    def _as_postgres(self, cmd: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-l",
                           str(self.dir / "log"), "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1",
                           "start"])

    def stop(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", "-m", "fast", "stop"])

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- idempotency (in-process app, shared services) ---------------------------------------------------------

def _upload(client: TestClient | httpx.Client, headers: dict[str, str], path: Path) -> str:
    with open(path, "rb") as fh:
        r = client.post("/v1/models", headers=headers, files={"file": ("tiny.onnx", fh)})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.services
def test_idempotency_key_makes_one_job(api: ApiHarness, tiny_onnx: Path) -> None:
    model_id = _upload(api.client, api.h(), tiny_onnx)
    body = {"model_id": model_id, **QUICK}
    key = {"Idempotency-Key": "retry-after-timeout-1"}
    first = api.client.post("/v1/jobs", headers={**api.h(), **key}, json=body)
    again = api.client.post("/v1/jobs", headers={**api.h(), **key}, json=body)
    assert first.status_code == 202 and again.status_code == 200, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]

    # Same key, different request: refused with a reason, no new job.
    other = api.client.post("/v1/jobs", headers={**api.h(), **key}, json={**body, "target_sparsity": 0.25})
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["detail"], other.text

    # Keys are per tenant: tenant B's identical key is a different job, and B never sees A's.
    b = api.client.post("/v1/jobs", headers={**api.h(api.key_b), **key},
                        json={**body, "model_id": _upload(api.client, api.h(api.key_b), tiny_onnx)})
    assert b.status_code == 202 and b.json()["id"] != first.json()["id"]

    # Concurrent retries with one fresh key: exactly one job (the unique index settles the race).
    race_key = {"Idempotency-Key": "burst-1"}
    codes: list[int] = []
    ids: list[str] = []

    def submit() -> None:
        r = api.client.post("/v1/jobs", headers={**api.h(), **race_key}, json=body)
        codes.append(r.status_code)
        ids.append(r.json()["id"])

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(ids)) == 1 and sorted(codes).count(202) == 1 and len(codes) == 6, (codes, ids)
    listed = api.client.get("/v1/jobs", headers=api.h(), params={"model_id": model_id, "limit": 200}).json()
    assert len(listed["items"]) == 2, "one job per Idempotency-Key: retry-after-timeout-1 and burst-1"


# --- PostgreSQL down -> 503 + Retry-After, back by itself ---------------------------------------------------

@pytest.mark.services
def test_postgres_down_is_503_with_retry_after_and_recovers(tmp_path: Path, redis_url: str) -> None:
    pg = OwnPostgres()
    try:
        pg.start()
        upgrade(pg.url)
        key = add_key(pg.url, "pg-restart")
        h = {"Authorization": f"Bearer {key}"}

        def app(ping_idle_s: float, auth_cache_s: float = 0) -> TestClient:
            settings = Settings(database_url=pg.url, broker_url=redis_url, data_dir=tmp_path / "data",
                                sweep_interval_s=0, retry_after_s=7, db_ping_idle_s=ping_idle_s,
                                auth_cache_s=auth_cache_s)
            return TestClient(create_app(settings, CeleryDispatcher(redis_url, settings.visibility_timeout_s)))

        with app(2.0) as client:
            assert client.get("/v1/models", headers=h).status_code == 200  # pool now holds a live connection
            pg.stop()
            for path in ("/v1/models", "/v1/jobs", "/healthz"):
                r = client.get(path, headers=h)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert r.headers["retry-after"] == "7" and r.headers["content-type"] == "application/problem+json"
                assert "database is unreachable" in r.json()["detail"]
            pg.start()
            # The failed requests made the pool drop its connections: the first one after the restart connects anew.
            r = client.get("/v1/models", headers=h)
            assert r.status_code == 200, r.text
            assert client.get("/healthz").status_code == 200

        # A restart nobody noticed (no request while the database was down), with no pre-ping on every checkout
        # (db/session.py): a connection idle for longer than db_ping_idle_s is pinged and silently replaced; one
        # used more recently than that fails its request once (503 + Retry-After), after which the pool has
        # replaced every connection that predates the failure. The API has two pools (api/reads.py: the asyncio
        # one for hot reads, the sync one for the rest); a disconnect seen by either drops the other's connections:
        # `trusted` (no key cache) fails in the asyncio pool first, `cached` (key cache on) in the sync one.
        with app(0.0) as pinged, app(3600.0) as trusted, app(3600.0, auth_cache_s=3600) as cached:
            for client in (pinged, trusted, cached):
                assert client.get("/v1/jobs", headers=h).status_code == 200
                assert client.get(f"/v1/jobs/{'0' * 32}", headers=h).status_code == 404  # the hot read path too
            pg.stop()
            pg.start()
            assert pinged.get("/v1/jobs", headers=h).status_code == 200, "idle connection pinged and replaced"
            first = trusted.get("/v1/jobs", headers=h)
            assert first.status_code == 503 and first.headers["retry-after"] == "7", first.text
            assert trusted.get("/v1/jobs", headers=h).status_code == 200, "the pool recovers after one failure"
            assert trusted.get(f"/v1/jobs/{'0' * 32}", headers=h).status_code == 404
            assert trusted.get("/healthz").status_code == 200
            first = cached.get("/v1/jobs", headers=h)  # key from the cache: the sync pool meets the dead socket
            assert first.status_code == 503, first.text
            assert cached.get(f"/v1/jobs/{'0' * 32}", headers=h).status_code == 404, "asyncio pool not dropped"
    finally:
        pg.destroy()


# --- Celery stack on our own Redis: restart, SIGKILL -------------------------------------------------------

@dataclass
class Stack:
    base: str
    env: dict[str, str]
    redis: OwnRedis
    db_url: str
    headers: dict[str, str]
    model_id: str
    tmp: Path
    factory: sessionmaker[Session]

    def worker(self, tag: str) -> Proc:
        return Proc(["worker", "--queues", "gpu,cpu"], self.env, self.tmp / f"worker-{tag}.log", self.tmp)

    def row(self, job_id: str) -> Job:
        with self.factory() as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
            assert job is not None
            return job

    def submit(self, client: httpx.Client, spec: dict[str, Any]) -> str:
        r = client.post("/v1/jobs", headers=self.headers, json={"model_id": self.model_id, **spec})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    own = OwnRedis(tmp)
    own.start()
    name = fresh_pg_database("faults")
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    upgrade(db_url)
    env = service_env(database_url=db_url, broker_url=own.url, data_dir=str(tmp / "data"), **FAST_SWEEP)
    port = free_port()
    api = Proc(["serve", "--port", str(port)], env, tmp / "api.log", tmp)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        headers = {"Authorization": f"Bearer {add_key(db_url, 'faults')}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            model_id = _upload(c, headers, tiny_onnx)
        engine = make_engine(db_url, pool_size=1)
        yield Stack(f"http://127.0.0.1:{port}", env, own, db_url, headers, model_id, tmp,
                    make_session_factory(engine))
        engine.dispose()
    finally:
        api.stop()
        own.stop()
        drop_pg_database(name)


def _wait_row(stack: Stack, job_id: str, pred: Any, timeout: float, what: str) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.row(job_id)
        if pred(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {what} not reached in {timeout} s: {stack.row(job_id).__dict__}")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _pool_pid(job: Job) -> int:
    assert job.worker and ":" in job.worker, job.worker
    return int(job.worker.rpartition(":")[2])


@pytest.mark.services
@pytest.mark.slow
def test_redis_restart_with_jobs_queued_loses_none(stack: Stack) -> None:
    r = stack.redis.client()
    with httpx.Client(base_url=stack.base, timeout=60) as client:
        ids = [stack.submit(client, QUICK) for _ in range(3)]
        assert r.llen("gpu") == 3, "no worker yet: the three messages wait in the gpu queue"
        stack.redis.stop()  # no persistence: the queued messages are gone
        stack.redis.start()
        assert stack.redis.client().llen("gpu") == 0
        # The sweeper (in `serve`) notices queued rows missing from the broker after requeue_grace_s.
        deadline = time.monotonic() + 20
        while stack.redis.client().llen("gpu") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stack.redis.client().llen("gpu") == 3, "the sweeper re-sent each lost job"
        time.sleep(4)  # two more grace periods: messages now in the broker must not be sent again
        assert stack.redis.client().llen("gpu") == 3, "the sweeper re-sent each lost job exactly once"
        worker = stack.worker("restart")
        try:
            worker.wait_for(r"ready\.", timeout=120)
            done = [poll_job(client, j, stack.headers, timeout=240) for j in ids]
        finally:
            worker.stop()
    assert [d["status"] for d in done] == ["succeeded"] * 3, done
    assert [stack.row(j).attempts for j in ids] == [1, 1, 1], "each job ran exactly once"


@pytest.mark.services
@pytest.mark.slow
def test_sigkill_of_the_pool_process_mid_job(stack: Stack) -> None:
    """Celery requeues the message of a killed pool process (acks_late + reject_on_worker_lost); the next
    pool process takes the job over (or the sweeper re-queues it, whichever comes first: either way it runs
    once more). A job that keeps killing its worker fails after max_attempts (2)."""
    worker = stack.worker("pool")
    try:
        worker.wait_for(r"ready\.", timeout=120)
        with httpx.Client(base_url=stack.base, timeout=60) as client:
            once = stack.submit(client, LONG)
            job = _wait_row(stack, once, lambda j: j.status == "running" and j.progress > 0.02, 120, "training")
            os.kill(_pool_pid(job), signal.SIGKILL)
            done = poll_job(client, once, stack.headers, timeout=300)
            assert done["status"] == "succeeded", done
            assert stack.row(once).attempts == 2, "killed once, taken over once"

            poison = stack.submit(client, LONG)
            for attempt in (1, 2):
                job = _wait_row(stack, poison, lambda j, a=attempt: j.status == "running" and j.attempts == a
                                and j.progress > 0.02, 120, f"attempt {attempt} training")
                os.kill(_pool_pid(job), signal.SIGKILL)
            t0 = time.monotonic()
            failed = poll_job(client, poison, stack.headers, timeout=120)
            # Whoever notices first says why: the redelivered message (worker process died) or, while the pool
            # process is still being replaced, the sweeper (heartbeat stale). Both end the job with a reason.
            assert failed["status"] == "failed", failed
            assert "worker process died" in failed["error"] or "stopped responding" in failed["error"], failed
            assert stack.row(poison).attempts == 2
            assert time.monotonic() - t0 < 120
            # Messages still in flight (Celery's requeue of the killed delivery) are consumed as no-ops.
            deadline = time.monotonic() + 60
            while stack.redis.client().llen("gpu") and time.monotonic() < deadline:
                time.sleep(0.5)
            assert stack.redis.client().llen("gpu") == 0
            time.sleep(2)
            assert stack.row(poison).status == "failed", "a stale redelivery must not resurrect a failed job"
    finally:
        worker.stop()


@pytest.mark.services
@pytest.mark.slow
def test_sigkill_of_the_whole_worker_is_recovered_by_the_sweeper(stack: Stack) -> None:
    """The whole worker (main process and pool) dies: its unacked message would come back only after the
    Redis visibility timeout (hours). The heartbeat goes stale, the sweeper re-queues, a new worker finishes."""
    first = stack.worker("doomed")
    with httpx.Client(base_url=stack.base, timeout=60) as client:
        try:
            first.wait_for(r"ready\.", timeout=120)
            job_id = stack.submit(client, LONG)
            _wait_row(stack, job_id, lambda j: j.status == "running" and j.progress > 0.02, 120, "training")
            for pid in [*_children(first.p.pid), first.p.pid]:
                os.kill(pid, signal.SIGKILL)
            first.p.wait(10)
            killed_at = time.monotonic()
        finally:
            first.stop()
        # Bounded: stale after heartbeat_stale_s (4) + one sweep (1) + slack for 2 shared cores.
        requeued = _wait_row(stack, job_id, lambda j: j.status == "queued", 30, "re-queued by the sweeper")
        assert requeued.stage == "requeued: worker lost"
        assert time.monotonic() - killed_at < 30
        second = stack.worker("rescue")
        try:
            second.wait_for(r"ready\.", timeout=120)
            done = poll_job(client, job_id, stack.headers, timeout=300)
        finally:
            second.stop()
    assert done["status"] == "succeeded", done
    assert stack.row(job_id).attempts == 2


# --- out of memory ------------------------------------------------------------------------------------------

OOM_CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
from db.artifacts import ArtifactStore
from db.session import make_engine, make_session_factory
from hwprune.settings import Settings
from pruning_core.pipeline import warm_imports
warm_imports()  # what a worker process imports at start (worker/tasks._preload), before any job: not under the cap
from worker.runner import TaskContext, run_prune
data = sys.argv[1]
settings = Settings(data_dir=data)
ctx = TaskContext(factory=make_session_factory(make_engine(settings.resolved_database_url)),
                  store=ArtifactStore(settings.data_dir), settings=settings, enqueue_measure=lambda j: None)
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
# 256 MiB of headroom: the job's synthetic inputs alone need 400 MB (512 x 3 x 256 x 256 float32), so an
# allocation fails inside the job (no real memory is used).
resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, vm + 256 * 2**20))
run_prune(ctx, sys.argv[2])
"""


@pytest.mark.services
@pytest.mark.slow
def test_out_of_memory_fails_the_job_with_that_reason(tmp_path: Path) -> None:
    from db.artifacts import ArtifactStore
    from db.keys import create_key
    from db.models import ModelRecord
    from db.session import transaction

    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    store = ArtifactStore(tmp_path)
    with transaction(factory) as s:
        tenant, _ = create_key(s, "oom")
        m = ModelRecord(tenant_id=tenant.id, name="tiny", format="onnx", opset=17, inputs=[], outputs=[], params=1,
                        macs=1, sha256="0" * 64, size_bytes=1, input_shape=[1, 3, 256, 256])
        s.add(m)
        s.flush()
        spec = {**QUICK, "steps": 5, "input_shape": [1, 3, 256, 256]}
        j = Job(tenant_id=tenant.id, model_id=m.id, method="magnitude", granularity="channel", accelerator="cpu",
                spec=spec, status="queued", progress=0.0, cancel_requested=False, attempts=0)
        s.add(j)
        s.flush()
        job_id, path = j.id, store.model_path(tenant.id, m.id, "onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    make_tiny_onnx(path, size=256)
    env = {**service_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", OOM_CHILD, str(tmp_path), job_id], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status == "failed" and job.error is not None and "out of memory" in job.error, \
            (job.status, job.error, proc.stderr[-3000:])
