"""End to end against real parts: `hwprune serve` (API only) + `hwprune worker` (Celery, gpu+cpu queues) on
PostgreSQL + Redis, and the embedded default (`hwprune serve` with nothing else) -- all as subprocesses,
driven over HTTP: upload -> job -> events/poll -> download -> ONNX Runtime runs the pruned model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.service.conftest import Proc, free_port, poll_job, service_env, wait_http

# smart with a handful of steps on a 16x16 input: seconds of work, still a real prune + fine-tune + export.
JOB = {"method": "smart", "granularity": "channel", "accelerator": "cpu", "target_sparsity": 0.5, "steps": 10,
       "batch_size": 8, "latency_seconds": 1.0}


def _create_key(env: dict[str, str], cwd: Path, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "hwprune.cli", "keys", "create", "--tenant", tenant], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=120, check=True).stdout
    key = out.strip().splitlines()[-1]
    assert key.startswith("hwp_") and " " not in key, f"the key must be alone on the last line: {out!r}"
    return key


def _read_events(client: httpx.Client, job_id: str, headers: dict[str, str], sink: list[tuple[str, Any]]) -> None:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                sink.append((event, json.loads(line.split(":", 1)[1])))


def _initializer_elements(path: Path) -> int:
    return int(sum(np.prod(t.dims) for t in onnx.load(str(path)).graph.initializer))


def _run_and_check(client: httpx.Client, headers: dict[str, str], tiny_onnx: Path, tmp: Path) -> dict[str, Any]:
    """Upload, submit, follow the SSE stream to the end, download, run on ONNX Runtime. Returns the job."""
    with open(tiny_onnx, "rb") as fh:
        model = client.post("/v1/models", headers=headers, files={"file": ("tiny.onnx", fh)}).json()
    r = client.post("/v1/jobs", headers=headers, json={"model_id": model["id"], **JOB})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events: list[tuple[str, Any]] = []
    reader = threading.Thread(target=_read_events, args=(client, job_id, headers, events))
    reader.start()
    job = poll_job(client, job_id, headers, timeout=400)
    reader.join(60)
    assert job["status"] == "succeeded", job
    assert not reader.is_alive(), "the SSE stream must close after the terminal state"

    # Events: the terminal status arrives, progress never goes backwards, the worker's stages show up.
    assert events and events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    progress = [e[1]["progress"] for e in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {"running"} <= {e[1]["status"] for e in events}

    # Row metrics copied from the report for the list view.
    m = job["metrics"]
    assert job["speedup"] is not None and job["speedup"] > 0 and m["speedup"] == job["speedup"]
    assert 0 < job["achieved_sparsity"] < 1 and m["latency_ms"]["dense"] > 0 and m["latency_ms"]["pruned"] > 0
    assert set(m["fidelity"]) >= {"cosine", "top1_agreement", "rel_l2"}
    listed = client.get("/v1/jobs", headers=headers, params={"status": "succeeded"}).json()["items"]
    assert job_id in [j["id"] for j in listed]

    # Artifacts: ONNX Runtime loads and runs the pruned model; the report says what was done.
    onnx_path, report_path = tmp / f"{job_id}.onnx", tmp / f"{job_id}.json"
    for name, path in (("model.onnx", onnx_path), ("report.json", report_path)):
        r = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers)
        assert r.status_code == 200, r.text
        path.write_bytes(r.content)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.random.rand(1, 3, 16, 16).astype(np.float32)})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
    report = json.loads(report_path.read_text())
    assert (report["method"], report["granularity"]) == ("smart", "channel")
    assert report["achieved_sparsity"] == pytest.approx(job["achieved_sparsity"])
    assert report["params"]["pruned"] < report["params"]["dense"]
    # Channel pruning removes weights physically: the downloaded file has fewer weights than the upload.
    assert _initializer_elements(onnx_path) < _initializer_elements(tiny_onnx)
    assert report["latency_ms"]["pruned"]["median"] > 0 and report["explain"]
    return job


StartStack = Callable[..., tuple[str, dict[str, str]]]


@pytest.fixture()
def celery_stack(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[StartStack]:
    """`start(**settings)` runs `hwprune worker` + `hwprune serve` (API only) on the session's PostgreSQL and
    Redis with extra HWPRUNE_* settings, waits until both are ready and returns (API URL, env); teardown stops
    whatever was started."""
    procs: list[Proc] = []

    def start(**settings: str) -> tuple[str, dict[str, str]]:
        env = service_env(database_url=pg_url, broker_url=redis_url, data_dir=str(tmp_path / "data"), **settings)
        port = free_port()
        worker = Proc(["worker", "--queues", "gpu,cpu"], env, tmp_path / "worker.log", tmp_path)
        procs.append(worker)
        procs.append(Proc(["serve", "--port", str(port)], env, tmp_path / "api.log", tmp_path))
        worker.wait_for(r"ready\.", timeout=120)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return f"http://127.0.0.1:{port}", env

    try:
        yield start
    finally:
        for p in reversed(procs):  # API first, then the worker
            p.stop()


@pytest.mark.services
@pytest.mark.slow
def test_celery_worker_end_to_end(celery_stack: StartStack, tiny_onnx: Path, tmp_path: Path) -> None:
    url, env = celery_stack(progress_interval_s="0.2")
    key = _create_key(env, tmp_path, "e2e-a")
    other = _create_key(env, tmp_path, "e2e-b")
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/healthz").json()["mode"] == "celery"
        job = _run_and_check(client, h, tiny_onnx, tmp_path)
        assert job["started_at"] and job["finished_at"]

        # Another tenant sees none of it, over real HTTP too.
        hb = {"Authorization": f"Bearer {other}"}
        for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/artifacts/model.onnx",
                     f"/v1/models/{job['model_id']}"):
            assert client.get(path, headers=hb).status_code == 404

        # Cancel a running job: the pruner sees the flag between steps and stops; the worker keeps serving.
        long_job = client.post("/v1/jobs", headers=h, json={
            "model_id": job["model_id"], **JOB, "steps": 100_000}).json()
        running = poll_job(client, long_job["id"], h, timeout=200, until=frozenset({"running", "succeeded",
                                                                                      "failed", "cancelled"}))
        assert running["status"] == "running", running
        t0 = time.monotonic()
        assert client.post(f"/v1/jobs/{long_job['id']}/cancel", headers=h).json()["cancel_requested"]
        done = poll_job(client, long_job["id"], h, timeout=120)
        assert done["status"] == "cancelled" and done["error"] == "cancelled by its owner", done
        assert time.monotonic() - t0 < 60, "cancel must act between steps, not at the end of 100k steps"

        # A job that fails in the pipeline ends with a reason, and the worker is still alive afterwards.
        with open(tiny_onnx, "rb") as fh:
            model = client.post("/v1/models", headers=h, files={"file": ("t.onnx", fh)}).json()
        bad = client.post("/v1/jobs", headers=h, json={"model_id": model["id"], **JOB,
                                                       "input_shape": [1, 5, 16, 16]}).json()
        failed = poll_job(client, bad["id"], h, timeout=200)
        assert failed["status"] == "failed" and failed["error"], failed
        assert "internal error" not in failed["error"], "a bad input shape is the user's to fix: say why"


@pytest.mark.slow
def test_embedded_default_end_to_end(tiny_onnx: Path, tmp_path: Path) -> None:
    """`hwprune serve` with no broker and no database: SQLite + local folder + its own worker."""
    data = tmp_path / "fresh"
    env = service_env(data_dir=str(data), progress_interval_s="0.2")
    port = free_port()
    srv = Proc(["serve", "--port", str(port)], env, tmp_path / "serve.log", tmp_path)
    try:
        key = srv.wait_for(r"^(hwp_\S+)$", timeout=120).group(1)
        assert f"http://127.0.0.1:{port}" in srv.text()
        srv.wait_for(r"froze \d+ startup objects", timeout=60)  # logged just after the key: api/gc_tuning.py
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert (data / "hwprune.db").is_file(), "embedded serve must create and migrate its own SQLite file"
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/healthz").json()["mode"] == "embedded"
            job = _run_and_check(client, h, tiny_onnx, tmp_path)
        assert list((data / "tenants").rglob(f"jobs/{job['id']}/model.onnx")), "artifacts live under data_dir"
    finally:
        srv.stop()
    # A restart keeps the data and does not mint another key.
    srv2 = Proc(["serve", "--port", str(port)], env, tmp_path / "serve2.log", tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert "hwp_" not in srv2.text()
        r = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", headers=h)
        assert r.json()["status"] == "succeeded"
    finally:
        srv2.stop()


@pytest.mark.services
@pytest.mark.slow
def test_celery_time_limit_fails_the_job_with_a_reason(celery_stack: StartStack, tiny_onnx: Path,
                                                        tmp_path: Path) -> None:
    url, env = celery_stack(job_soft_time_limit_s="3", job_hard_time_limit_s="8")
    h = {"Authorization": f"Bearer {_create_key(env, tmp_path, 'limits')}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        with open(tiny_onnx, "rb") as fh:
            model = client.post("/v1/models", headers=h, files={"file": ("t.onnx", fh)}).json()
        job = client.post("/v1/jobs", headers=h, json={"model_id": model["id"], **JOB, "steps": 100_000}).json()
        done = poll_job(client, job["id"], h, timeout=120)
    assert done["status"] == "failed" and "time limit" in (done["error"] or ""), done
