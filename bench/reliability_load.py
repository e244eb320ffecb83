"""Load experiment (issue 7): N small jobs submitted at once to W Celery workers; every job must end terminal,
none may run twice, none may be lost. Records queue depth over time and throughput.

Real parts: its own redis-server (free port), a fresh database on the local PostgreSQL (dropped afterwards),
`hwprune serve` (API + sweeper) and W `hwprune worker --concurrency 1` subprocesses.

    python bench/reliability_load.py --jobs 200 --workers 2 --out docs/reliability-load.md

"Ran twice" is checked two ways: the row's `attempts` (claims) and the workers' logs (one "pruned in" line per
job across all workers).
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from db.migrate import upgrade
from tests.service.conftest import (
    Proc,
    add_key,
    drop_pg_database,
    free_port,
    fresh_pg_database,
    make_tiny_onnx,
    service_env,
    wait_http,
)
from tests.service.jobspecs import QUICK
from tests.service.test_faults import OwnRedis

JOB = {**QUICK, "steps": 1}  # one fine-tuning step: the experiment is about the queue, not the pruning
TERMINAL = {"succeeded", "failed", "cancelled"}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the experiment; returns the headline numbers (tests/service/test_load.py calls this)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="hwprune-load-"))
    own = OwnRedis(tmp)
    own.start()
    name = fresh_pg_database("load")
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    procs: list[Proc] = []
    try:
        upgrade(db_url)
        env = service_env(database_url=db_url, broker_url=own.url, data_dir=str(tmp / "data"),
                          progress_interval_s="1", sweep_interval_s="5")
        port = free_port()
        procs.append(Proc(["serve", "--port", str(port)], env, tmp / "api.log", tmp))
        workers = [Proc(["worker", "--queues", "gpu,cpu", "--concurrency", "1", "--name", f"load{i}@%h"], env,
                        tmp / f"worker{i}.log", tmp) for i in range(args.workers)]
        procs += workers
        for w in workers:
            w.wait_for(r"ready\.", timeout=300)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        h = {"Authorization": f"Bearer {add_key(db_url, 'load')}"}
        model = make_tiny_onnx(tmp / "tiny.onnx")
        with httpx.Client(base_url=base, timeout=120) as client:
            with open(model, "rb") as fh:
                model_id = client.post("/v1/models", headers=h, files={"file": ("tiny.onnx", fh)}).json()["id"]

            # Submit everything at once (8 concurrent submitters).
            ids: list[str] = []
            lock = threading.Lock()

            def submit(n: int) -> None:
                with httpx.Client(base_url=base, timeout=120) as c:
                    for _ in range(n):
                        r = c.post("/v1/jobs", headers=h, json={"model_id": model_id, **JOB})
                        assert r.status_code == 202, r.text
                        with lock:
                            ids.append(r.json()["id"])

            t0 = time.monotonic()
            per = [args.jobs // 8 + (1 if i < args.jobs % 8 else 0) for i in range(8)]
            threads = [threading.Thread(target=submit, args=(n,)) for n in per]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            submit_s = time.monotonic() - t0

            # Watch queue depth and job states until every job is terminal.
            r = own.client()
            samples: list[tuple[float, int, int, int]] = []  # (t, gpu depth, cpu depth, terminal)
            finished_at: dict[str, float] = {}
            while True:
                now = time.monotonic() - t0
                items: list[dict[str, object]] = []
                cursor = None
                while True:
                    params: dict[str, str | int] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
                    page = client.get("/v1/jobs", headers=h, params=params).json()
                    items += page["items"]
                    cursor = page["next_cursor"]
                    if not cursor:
                        break
                for j in items:
                    if j["status"] in TERMINAL and j["id"] not in finished_at:
                        finished_at[str(j["id"])] = now
                samples.append((now, int(r.llen("gpu")), int(r.llen("cpu")), len(finished_at)))
                if len(finished_at) >= args.jobs or now > args.timeout:
                    break
                time.sleep(1.0)
            wall = time.monotonic() - t0
            final = {str(j["id"]): j for j in items}
        statuses = Counter(str(j["status"]) for j in final.values())

        # None twice: attempts per row, and "pruned in" log lines per job across all workers.
        from sqlalchemy import select

        from db.models import Job
        from db.session import make_engine, make_session_factory
        engine = make_engine(db_url, pool_size=1)
        with make_session_factory(engine)() as s:
            attempts = Counter(a for (a,) in s.execute(select(Job.attempts)).all())
        engine.dispose()
        pruned = Counter(m for w in workers for m in re.findall(r"job (\w+) pruned in", w.text()))
        per_worker = [len(re.findall(r"job \w+ pruned in", w.text())) for w in workers]
    finally:
        for p in reversed(procs):
            p.stop()
        own.stop()
        drop_pg_database(name)

    lost = set(ids) - set(final) | {j for j, x in final.items() if x["status"] not in TERMINAL}
    twice = [j for j, n in pruned.items() if n > 1]
    latencies = sorted(finished_at.values())
    max_gpu = max(s[1] for s in samples)
    max_cpu = max(s[2] for s in samples)
    depth_rows = [s for i, s in enumerate(samples) if i % max(1, len(samples) // 10) == 0] + [samples[-1]]

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### Load: {args.jobs} jobs at once to {args.workers} workers",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; `nproc` = {nproc} "
        f"({cpu_model()}), shared with other agents; own redis-server, local PostgreSQL 15.",
        f"Command: `python bench/reliability_load.py --jobs {args.jobs} --workers {args.workers}`; job: `{JOB}`.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| jobs submitted / rows / terminal | {len(ids)} / {len(final)} / {sum(statuses[s] for s in TERMINAL)} |",
        f"| statuses | {dict(statuses)} |",
        f"| lost (not terminal or missing) | {len(lost)} |",
        f"| ran twice (log lines > 1) / attempts histogram | {len(twice)} / {dict(attempts)} |",
        f"| jobs pruned per worker | {per_worker} |",
        f"| submit time for all jobs | {submit_s:.1f} s |",
        f"| wall time until all terminal | {wall:.1f} s |",
        f"| throughput | {len(finished_at) / wall * 60:.1f} jobs/min |",
        f"| time to terminal p50 / p90 / max | {statistics.median(latencies):.1f} / "
        f"{latencies[int(0.9 * (len(latencies) - 1))]:.1f} / {latencies[-1]:.1f} s |",
        f"| max queue depth gpu / cpu | {max_gpu} / {max_cpu} |",
        "",
        "Queue depth over time (Redis list lengths; messages a worker has reserved are not counted):",
        "",
        "| t (s) | gpu queue | cpu queue | terminal jobs |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {t:.0f} | {g} | {c} | {d} |" for t, g, c, d in depth_rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    assert not lost and not twice, f"lost {sorted(lost)[:5]}, twice {twice[:5]}"
    return {"submitted": len(ids), "rows": len(final), "statuses": dict(statuses), "lost": len(lost),
            "twice": len(twice), "attempts": dict(attempts), "per_worker": per_worker, "wall_s": wall,
            "max_depth": max_gpu}


if __name__ == "__main__":
    main()
