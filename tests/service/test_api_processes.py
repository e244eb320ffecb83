"""Several API processes (`hwprune serve --workers N`, issue 4) and several sweepers: a lost job is re-sent once,
not once per process; the embedded default refuses more than one process."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import ValidationError
from sqlalchemy import select

from db.keys import create_key
from db.models import Job, ModelRecord, utcnow
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from lifecycle.sweeper import Sweeper, SweepResult
from tests.service.conftest import Proc, add_key, free_port, service_env, wait_http


def _lost_job(pg_url: str, tenant: str) -> str:
    """A queued job row whose broker message is gone, last touched long ago: the sweeper must re-send it."""
    engine = make_engine(pg_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            t, _ = create_key(s, tenant)
            m = ModelRecord(tenant_id=t.id, name="m", format="onnx", opset=17, inputs=[], outputs=[], params=1,
                            macs=1, sha256="0" * 64, size_bytes=1, input_shape=[1, 3, 16, 16])
            s.add(m)
            s.flush()
            old = utcnow() - timedelta(hours=1)
            job = Job(tenant_id=t.id, model_id=m.id, method="magnitude", granularity="channel", accelerator="cpu",
                      spec={"target_sparsity": 0.5}, status="queued", progress=0.0, cancel_requested=False,
                      attempts=0, created_at=old, updated_at=old)
            s.add(job)
            s.flush()
            return job.id
    finally:
        engine.dispose()


@pytest.mark.services
def test_two_sweepers_that_saw_the_same_lost_job_send_it_once(pg_url: str) -> None:
    job_id = _lost_job(pg_url, "two-sweepers")
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    settings = Settings(database_url=pg_url, broker_url="redis://127.0.0.1:6379/13", requeue_grace_s=1)
    sent: list[tuple[str, str]] = []
    try:
        a, b = (Sweeper(factory, settings, lambda task, q, j, who=who: sent.append((who, j)),
                        in_broker=lambda queues, ids: set()) for who in ("a", "b"))
        # Both read the row before either acted on it (two API replicas sweeping in the same instant).
        with factory() as s:
            seen = s.execute(select(Job.id, Job.status, Job.updated_at).where(Job.id == job_id)).all()
        a._resend_missing(seen, SweepResult())
        b._resend_missing(seen, SweepResult())
        assert sent == [("a", job_id)], "the second sweeper's guarded UPDATE must match nothing"
        assert job_id not in b.sweep().resent, "the re-send touched updated_at: a full grace before the next"
    finally:
        engine.dispose()


def test_more_than_one_api_process_needs_a_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="HWPRUNE_API_WORKERS"):
        Settings(data_dir=tmp_path, api_workers=2)
    r = subprocess.run([sys.executable, "-m", "hwprune.cli", "serve", "--workers", "2", "--port", "1"],
                       env=service_env(data_dir=str(tmp_path)), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "HWPRUNE_BROKER_URL" in r.stderr, r.stderr


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return out


@pytest.mark.services
def test_serve_with_two_processes_answers_and_re_sends_a_lost_job_once(pg_url: str, redis_url: str,
                                                                      tmp_path: Path) -> None:
    job_id = _lost_job(pg_url, "two-processes")
    key = add_key(pg_url, "two-processes-api")
    env = service_env(database_url=pg_url, broker_url=redis_url, data_dir=str(tmp_path / "data"),
                      sweep_interval_s="0.3", requeue_grace_s="1")
    port = free_port()
    srv = Proc(["serve", "--port", str(port), "--workers", "2"], env, tmp_path / "api.log", tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        srv.wait_for(r"2 processes", timeout=30)
        cmdlines = {c: Path(f"/proc/{c}/cmdline").read_bytes() for c in _children(srv.p.pid)}
        workers = [c for c, cmd in cmdlines.items() if b"spawn_main" in cmd]  # not multiprocessing's helpers
        assert len(workers) == 2, (cmdlines, srv.text()[-2000:])
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for _ in range(20):  # new connections, so both processes get some
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as fresh:
                    assert fresh.get("/v1/jobs", headers=h).status_code == 200
            assert c.get(f"/v1/jobs/{job_id}", headers=h).status_code == 404, "another tenant's job"
        # The supervising process sweeps; several sweeps pass, the lost job goes back to the broker exactly once.
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(job_id.encode() in m for m in r.lrange("gpu", 0, -1)):
            time.sleep(0.2)
        time.sleep(2.0)  # a few more sweeps; messages in the broker must not be sent again
        assert sum(job_id.encode() in m for m in r.lrange("gpu", 0, -1)) == 1, srv.text()[-2000:]
    finally:
        srv.stop()
    assert "Traceback" not in srv.text(), srv.text()[-3000:]
