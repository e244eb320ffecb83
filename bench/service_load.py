"""Service load benchmark against the Redis + PostgreSQL stack on this machine (issue 4, "Benchmark").

Starts `hwprune worker --queues gpu,cpu` and `hwprune serve` (API only) as subprocesses on a fresh PostgreSQL
database and a dedicated Redis db, then measures:

1. status polling: `GET /v1/jobs/{id}` throughput and p50/p99 latency at 1, 16 and 64 concurrent closed-loop
   clients, against the baseline `GET /healthz` (no auth, `SELECT 1`) measured the same way in the same run, plus
   the API's own CPU time per request (all its processes). The load generator is `wrk` (C, one thread) when it
   is installed (`apt-get install -y wrk`), else httpx async in Python (`--client` picks one); the table says
   which ran;
2. submission-to-pickup: `started_at - created_at` of job rows (API insert -> worker claim), against the
   baseline of a bare Redis LPUSH -> BRPOP round trip;
3. API memory while uploading: peak RSS growth of the API process (VmHWM, reset before each upload) for a small
   model (baseline), 200 MB of non-model bytes (streaming + rejection) and a real 200 MB ONNX model (streaming
   + `inspect_model`).

    python bench/service_load.py [--duration 5] [--clients 1,16,64] [--upload-mb 200] [--pickups 8]
                                 [--client auto|wrk|httpx] [--api-workers N] [--polling-only]

Prints a markdown table and writes it with date, machine and command to docs/benchmarks/service.md
(`--polling-only`: prints the polling table, writes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import psycopg
import redis
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.keys import create_key  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.models import Job  # noqa: E402
from db.session import make_engine, make_session_factory, transaction  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 14


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def status_of(pid: int, field: str) -> int:
    """kB value of a /proc/<pid>/status field (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (the uvicorn workers of `serve --workers N`)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(p)
    return total


def load(stack: Stack, path: str, headers: dict[str, str], clients: int, duration: float,
         client: str) -> dict[str, float]:
    """Closed-loop load plus the API's own CPU time per request (independent of how busy the cores are)."""
    c0 = tree_cpu_seconds(stack.api.pid)
    if client == "wrk":
        res = _load_wrk(stack.url, path, headers, clients, duration)
    else:
        res = asyncio.run(_load(stack.url, path, headers, clients, duration))
    res["cpu_ms"] = (tree_cpu_seconds(stack.api.pid) - c0) * 1000 / max(res["n"], 1)
    return res


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    assert m, f"unexpected wrk duration {value!r}"
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def _load_wrk(url: str, path: str, headers: dict[str, str], clients: int, duration: float) -> dict[str, float]:
    """wrk, one thread, `clients` connections each sending its next request as soon as the answer arrived."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    cmd = ["wrk", "-t1", "-c", str(clients), "-d", f"{seconds}s", "--timeout", "30s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url + path], capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    lat = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)\s*$", out, re.M))
    if set(lat) != {"50", "99"}:
        raise RuntimeError(f"could not read wrk's latency distribution:\n{out}")
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket:
        errors += sum(int(x) for x in socket.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": _ms(lat["50"]), "p99": _ms(lat["99"]), "n": n, "errors": errors}


def tiny_onnx(path: Path) -> Path:
    import torch
    from torch import nn

    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"])
    return path


def big_onnx(path: Path, mb: int) -> Path:
    """A real ONNX model of about `mb` MB: one MatMul with a square float32 weight."""
    n = int((mb * 1024 * 1024 / 4) ** 0.5)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


class Stack:
    def __init__(self, tmp: Path, api_workers: int = 1) -> None:
        self.db = f"hwprune_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        self.db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.db}"
        self.redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        redis.Redis.from_url(self.redis_url).flushdb()
        upgrade(self.db_url)
        self.port = 18000 + secrets.randbelow(2000)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HWPRUNE_")}
        env.update(HWPRUNE_DATABASE_URL=self.db_url, HWPRUNE_BROKER_URL=self.redis_url,
                   HWPRUNE_DATA_DIR=str(tmp / "data"), HWPRUNE_MAX_UPLOAD_BYTES=str(1024**3), PYTHONUNBUFFERED="1",
                   HWPRUNE_API_WORKERS=str(api_workers))
        self.logs = [open(tmp / "worker.log", "wb"), open(tmp / "api.log", "wb")]  # noqa: SIM115
        cli = [sys.executable, "-m", "hwprune.cli"]
        self.worker = subprocess.Popen([*cli, "worker", "--queues", "gpu,cpu", "--log-level", "WARNING"], env=env,
                                       cwd=tmp, stdout=self.logs[0], stderr=subprocess.STDOUT)
        self.api = subprocess.Popen([*cli, "serve", "--port", str(self.port), "--log-level", "warning"], env=env,
                                    cwd=tmp, stdout=self.logs[1], stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = make_engine(self.db_url)
        self.factory = make_session_factory(self.engine)
        with transaction(self.factory) as s:
            self.key = create_key(s, "bench")[1]
        self.h = {"Authorization": f"Bearer {self.key}"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise SystemExit("API did not start; see api.log")

    def close(self) -> None:
        for p in (self.api, self.worker):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in self.logs:
            f.close()
        self.engine.dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.db}'")
            c.execute(f'DROP DATABASE IF EXISTS "{self.db}"')
        redis.Redis.from_url(self.redis_url).flushdb()


async def _load(url: str, path: str, headers: dict[str, str], clients: int, duration: float) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        stop = time.perf_counter() + duration

        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.get(path, headers=headers)
                lat.append((time.perf_counter() - t0) * 1000)
                errors += r.status_code != 200

        t_start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - t_start
    return {"rps": len(lat) / elapsed, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "n": len(lat), "errors": errors}


def wait_job(stack: Stack, job_id: str, statuses: set[str], timeout: float = 300) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with stack.factory() as s:
            job = s.scalar(select(Job).where(Job.id == job_id))
            if job is not None and job.status in statuses:
                return job
        time.sleep(0.005)
    raise SystemExit(f"job {job_id} did not reach {statuses} in {timeout} s")


def pickups(stack: Stack, model_id: str, n: int) -> list[float]:
    """Submit, wait for the claim, cancel; the worker is idle before each submission."""
    out = []
    body = {"model_id": model_id, "method": "smart", "granularity": "channel", "accelerator": "cpu",
            "target_sparsity": 0.5, "steps": 100_000, "latency_seconds": 1}
    with httpx.Client(base_url=stack.url, headers=stack.h, timeout=30) as c:
        for _ in range(n + 1):
            job_id = c.post("/v1/jobs", json=body).json()["id"]
            job = wait_job(stack, job_id, {"running", "failed", "cancelled", "succeeded"})
            assert job.started_at is not None, f"job was never started: {job.status} {job.error}"
            out.append((job.started_at - job.created_at).total_seconds() * 1000)
            c.post(f"/v1/jobs/{job_id}/cancel")
            wait_job(stack, job_id, {"cancelled", "failed", "succeeded"})
    return out[1:]  # the first claim also warms the pool process' DB connection


def redis_roundtrip(url: str, n: int = 200) -> list[float]:
    r = redis.Redis.from_url(url)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        r.lpush("bench:rt", i)
        r.brpop(["bench:rt"], timeout=5)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process ended meanwhile
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def peak_kb(pid: int) -> int:
    try:
        return status_of(pid, "VmHWM")
    except FileNotFoundError:
        return 0


def upload_peak(stack: Stack, path: Path) -> tuple[int, float, float, float, int]:
    """(HTTP status, API peak RSS growth in MB while the body streamed, ... until the answer, file size).

    The body is sent from a generator, so we know when the last byte left: VmHWM read at that moment is the
    streaming peak; read again after the answer it includes the inspection that follows."""
    pid = stack.api.pid
    boundary = secrets.token_hex(8)
    marks: dict[str, int] = {}

    def body() -> Iterator[bytes]:
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        with open(path, "rb") as fh:
            while chunk := fh.read(256 * 1024):
                yield chunk
        time.sleep(0.2)  # let the server drain its socket buffer before sampling
        marks["streamed"] = status_of(pid, "VmHWM")
        yield f"\r\n--{boundary}--\r\n".encode()

    for p in (pid, *children(pid)):
        with contextlib.suppress(FileNotFoundError):
            Path(f"/proc/{p}/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = status_of(pid, "VmRSS")
    r = httpx.post(stack.url + "/v1/models", headers={**stack.h, "content-type":
                   f"multipart/form-data; boundary={boundary}"}, content=body(), timeout=600)
    peak = status_of(pid, "VmHWM")
    inspector = max((peak_kb(c) for c in children(pid)), default=0)
    return (r.status_code, (marks["streamed"] - before) / 1024, (peak - before) / 1024, inspector / 1024,
            path.stat().st_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per polling measurement")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--upload-mb", type=int, default=200)
    ap.add_argument("--pickups", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "service.md")
    ap.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto",
                    help="load generator for polling: auto = wrk when installed, else httpx")
    ap.add_argument("--api-workers", type=int, default=1, help="API processes (`serve --workers N`)")
    ap.add_argument("--polling-only", action="store_true", help="only the polling table, printed, not written")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    client_desc = wrk_version() if client == "wrk" else f"httpx {httpx.__version__} async (Python)"

    load_before = os.getloadavg()[0]
    pick: list[float] = []
    rt: list[float] = []
    uploads: list[tuple[str, int, float, float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="hwprune-bench-") as d:
        tmp = Path(d)
        stack = Stack(tmp, args.api_workers)
        try:
            with open(tiny_onnx(tmp / "tiny.onnx"), "rb") as fh:
                model = httpx.post(stack.url + "/v1/models", headers=stack.h, files={"file": ("tiny.onnx", fh)},
                                   timeout=60).json()
            # Worker must have started (pool process preloaded torch) before timing pick-ups.
            pick = pickups(stack, model["id"], 1 if args.polling_only else args.pickups)
            if not args.polling_only:
                rt = redis_roundtrip(stack.redis_url)
            with httpx.Client(base_url=stack.url, headers=stack.h) as c:
                job_id = c.get("/v1/jobs", params={"limit": 1}).json()["items"][0]["id"]
            polling = []
            for n in clients:
                base = load(stack, "/healthz", {}, n, args.duration, client)
                jobs = load(stack, f"/v1/jobs/{job_id}", stack.h, n, args.duration, client)
                polling.append((n, base, jobs))
            if not args.polling_only and args.api_workers == 1:
                garbage = tmp / "garbage.bin"
                with open(garbage, "wb") as fh:
                    for _ in range(args.upload_mb):
                        fh.write(os.urandom(1024 * 1024))
                uploads = [("small ONNX model (baseline)", *upload_peak(stack, tmp / "tiny.onnx")),
                           (f"{args.upload_mb} MB of non-model bytes (streamed, then rejected)",
                            *upload_peak(stack, garbage)),
                           (f"{args.upload_mb} MB ONNX model (streamed + inspect_model)",
                            *upload_peak(stack, big_onnx(tmp / "big.onnx", args.upload_mb)))]
        except BaseException:
            for name in ("api.log", "worker.log"):  # the temporary folder goes away: show why it failed
                log_path = tmp / name
                if log_path.exists():
                    print(f"--- last lines of {name} ---", file=sys.stderr)
                    print("\n".join(log_path.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
            raise
        finally:
            stack.close()

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Service load (Redis + PostgreSQL on this machine)",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: `nproc` = {nproc}, {cpu_model()}; 1-minute load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} when it ended (the cores may be shared with other work: absolute latencies are "
        "noisy, API CPU ms/req much less so)",
        f"- stack: `hwprune serve` (uvicorn, {args.api_workers} process{'es' if args.api_workers > 1 else ''}, API "
        "only) + `hwprune worker --queues gpu,cpu` (Celery prefork, concurrency 1), PostgreSQL and Redis on "
        "127.0.0.1",
        f"- load generator: {client_desc}, closed loop (each client sends its next request when the answer "
        "arrived), on the same cores",
        f"- command: `{' '.join(['python', 'bench/service_load.py', *sys.argv[1:]])}`",
        "",
        "## Status polling",
        "",
        "| clients | `GET /v1/jobs/{id}` req/s | p50 ms | p99 ms | API CPU ms/req | baseline `GET /healthz` req/s "
        "| p50 ms | p99 ms | API CPU ms/req |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, base, jobs in polling:
        lines.append(f"| {n} | {jobs['rps']:.0f} | {jobs['p50']:.1f} | {jobs['p99']:.1f} | {jobs['cpu_ms']:.2f} | "
                     f"{base['rps']:.0f} | {base['p50']:.1f} | {base['p99']:.1f} | {base['cpu_ms']:.2f} |")
    errs = sum(j["errors"] + b["errors"] for _, b, j in polling)
    lines += [
        "",
        f"Non-200 answers during polling: {errs}. Target: p99 < 50 ms at 16 clients. API CPU ms/req is the API",
        "processes' CPU time (utime+stime) over the requests they served: the cost of one status poll regardless of",
        "how contended the cores are; one dedicated core serves about 1000 / (CPU ms/req) polls per second.",
        "",
    ]
    if args.polling_only:
        print("\n".join(lines))
        return
    lines += [
        "## Submission to pick-up",
        "",
        "| measure | n | median ms | p90 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| job row `created_at` (API) -> `started_at` (worker claim) | {len(pick)} | {statistics.median(pick):.1f} | "
        f"{pct(pick, 0.9):.1f} | {max(pick):.1f} |",
        f"| baseline: Redis LPUSH -> BRPOP round trip | {len(rt)} | {statistics.median(rt):.2f} | {pct(rt, 0.9):.2f} | "
        f"{max(rt):.2f} |",
        "",
        "Target: pick-up < 250 ms. The worker was idle before each submission (each job is cancelled once claimed).",
        "",
        "## API memory during an upload",
        "",
        "| upload | HTTP status | size MB | API peak RSS growth while streaming, MB | ... until answered, MB "
        "| inspection process peak RSS, MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for what, status, streamed, grow, insp, size in uploads:
        lines.append(f"| {what} | {status} | {size / 1024**2:.1f} | {streamed:.1f} | {grow:.1f} | {insp:.0f} |")
    lines += [
        "",
        "Peak RSS = the API process' VmHWM, reset through /proc/<pid>/clear_refs right before each upload, read",
        "once the last file byte was sent (streaming) and again after the answer. `inspect_model` (which parses",
        "the whole ONNX protobuf, weights included) runs in a spawned inspection process (api/inspection.py), so",
        "its memory shows in the last column (absolute, includes the interpreter with onnx + torch imported),",
        "not in the API's; inspection processes are recycled every 8 uploads.",
        "",
    ]
    if not uploads:
        lines += ["(not measured: with --api-workers > 1 the upload lands in one of several processes)", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The hand-written reading at the end of the file ("## Reading ...") stays; only the tables above it change.
    old = args.out.read_text() if args.out.exists() else ""
    reading = old[old.index(READING):] if READING in old else ""
    args.out.write_text(text + ("\n" + reading if reading else ""))


READING = "## Reading"


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "wrk"
    return f"`{first.split(' Copyright')[0].strip()}` (C, 1 thread)"


if __name__ == "__main__":
    main()
