"""Upload inspection runs in spawned processes; they must not outlive an API process that was killed hard."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.service.conftest import Proc, free_port, service_env, wait_http


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_inspection_workers_exit_when_the_api_is_killed(tiny_onnx: Path, tmp_path: Path) -> None:
    port = free_port()
    srv = Proc(["serve", "--port", str(port)], service_env(data_dir=str(tmp_path / "d")), tmp_path / "s.log", tmp_path)
    try:
        key = srv.wait_for(r"^(hwp_\S+)$", timeout=120).group(1)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with open(tiny_onnx, "rb") as f:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"},
                           files={"file": ("tiny.onnx", f)}, timeout=120)
        assert r.status_code == 201, r.text
        workers = [c for c in _children(srv.p.pid)
                   if "multiprocessing" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
        assert workers, "the upload must have been inspected in a spawned process"
        srv.p.send_signal(signal.SIGKILL)  # no lifespan shutdown, no pool.shutdown(): the OOM-killer case
        srv.p.wait(10)
        deadline = time.monotonic() + 15  # the watchdog polls its parent once a second
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "inspection processes outlived the API"
    finally:
        srv.stop()
