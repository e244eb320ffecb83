"""Channel-pruning speedup on ONNX Runtime CPU: measured speedup vs the MACs ratio (the ideal).

For each torchvision model (weights=None, batch 1, 224x224): export to ONNX, ingest it as the service
does (`pruning_core.ingest.load_model`), channel-prune it with our geometry (`build_plan(..., "channel",
cpu profile)`, uniform allocation of the magnitude scores, `plan.finalize`) at the sparsity that leaves
50% of the dense MACs (bisection on the real MAC count), export both dense and pruned with
`export_onnx`, and time them with `measure_pair` (interleaved, same threads and settings).

quotient = measured speedup / (dense MACs / pruned MACs); 1.0 means the runtime realised all of the saving.

    python bench/speedup.py [--models resnet18,resnet50,mobilenet_v2] [--threads 1] [--seconds 60]
        [--allocation uniform|global] [--channel-multiple 32] [--profile-ops] [--width-sweep]
        [--json raw.json] [--out table.md]

Results and their analysis: docs/benchmarks/speedup.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
import torchvision
from torch import nn

from pruning_core.accelerators import BUILTIN_PROFILES, resolve_profile
from pruning_core.export import export_onnx
from pruning_core.geometry import build_plan
from pruning_core.ingest import load_model
from pruning_core.latency import measure_many, measure_pair, session_options
from pruning_core.macs import count_macs

SHAPE = [1, 3, 224, 224]
TARGET_MACS = 0.5  # kept fraction of dense MACs
MACS_TOL = 0.01  # bisection stops within 1 percentage point of the target


PROFILE = BUILTIN_PROFILES["cpu"]  # channel multiple 8 (AVX2 SIMD width); --channel-multiple overrides


def _prune(module: nn.Module, sparsity: float, x: torch.Tensor, allocation: str) -> tuple[nn.Module, Any]:
    m = copy.deepcopy(module)
    plan = build_plan(m, x, "channel", PROFILE)
    masks = plan.select([s.detach() for s in plan.group_norms()], sparsity, allocation=allocation)
    return plan.finalize(masks), plan


def prune_to_half_macs(module: nn.Module, x: torch.Tensor, allocation: str) -> tuple[nn.Module, Any, float, int]:
    """Bisection on the group sparsity until pruned MACs are within MACS_TOL of TARGET_MACS x dense."""
    dense = count_macs(module, x)
    lo, hi = 0.0, 0.95
    best: tuple[float, nn.Module, Any, float, int] | None = None
    for _ in range(12):
        s = (lo + hi) / 2
        pruned, plan = _prune(module, s, x, allocation)
        macs = count_macs(pruned, x)
        ratio = macs / dense
        if best is None or abs(ratio - TARGET_MACS) < abs(best[0] - TARGET_MACS):
            best = (ratio, pruned, plan, s, macs)
        print(f"    sparsity {s:.4f}: MACs {ratio:.4f} of dense", file=sys.stderr)
        if abs(ratio - TARGET_MACS) <= MACS_TOL or hi - lo < 2e-3:
            break  # within tolerance, or the channel multiple makes MACs jump over the target
        if ratio > TARGET_MACS:
            lo = s
        else:
            hi = s
    assert best is not None
    return best[1], best[2], best[3], best[4]


def node_profiles(paths: list[Path], threads: int, runs: int = 40, warmup: int = 5) -> list[dict[str, dict[str, Any]]]:
    """Per ORT node (after graph optimisation) of each model: op type, ms per run, MACs (from the profiled
    shapes). Runs of the models alternate, like `measure_pair`, so load changes hit all of them equally."""
    so = session_options(threads)  # the same settings as every latency measurement
    so.enable_profiling = True
    feed = torch.randn(*SHAPE).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, path in enumerate(paths):
            so.profile_file_prefix = str(Path(tmp) / f"p{i}")
            sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
        for _ in range(warmup + runs):
            for sess in sessions:
                sess.run(None, {sess.get_inputs()[0].name: feed})
        all_events = [json.loads(Path(sess.end_profiling()).read_text()) for sess in sessions]
    out = []
    for events in all_events:
        times: dict[str, list[float]] = defaultdict(list)
        nodes: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            name, a = e["name"].removesuffix("_kernel_time"), e["args"]
            times[name].append(e["dur"] / 1000.0)
            macs = 0
            if a["op_name"] in ("Conv", "FusedConv", "Gemm", "MatMul") and len(a["input_type_shape"]) >= 2:
                w = next(iter(a["input_type_shape"][1].values()))
                o = next(iter(a["output_type_shape"][0].values()))
                per_out = math.prod(w[1:]) if a["op_name"] in ("Conv", "FusedConv") else w[0]
                macs = math.prod(o) * per_out
            nodes[name] = {"op": a["op_name"], "macs": macs}
        for name, t in times.items():  # median over the timed runs: one preempted run must not dominate
            nodes[name]["ms"] = statistics.median(t[warmup:] or t)
        out.append(nodes)
    return out


def bench_model(name: str, threads: int, seconds: float, allocation: str, profile_ops: bool,
                tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    src = tmp / f"{name}.onnx"
    x = torch.randn(*SHAPE)
    torch.onnx.export(model, (x,), str(src), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    t0 = time.perf_counter()
    loaded = load_model(src, SHAPE)
    module = loaded.module.eval()
    pruned, plan, sparsity, pruned_macs = prune_to_half_macs(module, x, allocation)
    dense_macs = count_macs(module, x)
    dense_path, pruned_path = tmp / f"{name}_dense.onnx", tmp / f"{name}_pruned.onnx"
    for mod, path in ((module, dense_path), (pruned, pruned_path)):  # same exporter for both
        export_onnx(mod, path, SHAPE, loaded.input_names, loaded.output_names, loaded.dynamic_batch)
    prep_s = time.perf_counter() - t0
    d, p = measure_pair(dense_path, pruned_path, SHAPE, SHAPE, threads=threads, warmup=10, min_runs=40,
                        max_seconds=seconds)
    measured = d.median / p.median
    ideal = dense_macs / pruned_macs
    row: dict[str, Any] = {
        "model": name, "group_sparsity": sparsity, "dense_macs": dense_macs, "pruned_macs": pruned_macs,
        "dense": d.to_dict(), "pruned": p.to_dict(), "measured_speedup": measured, "macs_speedup": ideal,
        "quotient": measured / ideal, "prep_s": prep_s,
        "layers": [r.to_dict() for r in plan.layers],
    }
    if profile_ops:
        row["nodes_dense"], row["nodes_pruned"] = node_profiles([dense_path, pruned_path], threads)
    return row


def width_sweep(threads: int, seconds: float, tmp: Path, widths: range = range(64, 137, 8)) -> str:
    """GMAC/s of one 3x3 conv (28x28, C in = C out) per channel count: does ORT's kernel care about the width?"""
    paths, macs = [], []
    for c in widths:
        conv = nn.Conv2d(c, c, 3, padding=1).eval()
        path = tmp / f"conv{c}.onnx"
        export_onnx(conv, path, [1, c, 28, 28], ["x"], ["y"], slim=False)
        paths.append(path)
        macs.append(c * c * 9 * 28 * 28)
    stats = measure_many(paths, [[1, c, 28, 28] for c in widths], threads=threads, min_runs=60,
                         max_seconds=seconds)
    lines = ["3x3 conv, 28x28, batch 1, C in = C out, interleaved runs:", "",
             "| channels | MACs (M) | wall ms (median) | CPU ms (median) | GMAC/s wall | GMAC/s CPU |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, m, st in zip(widths, macs, stats, strict=True):
        cpu = st.cpu_median or float("nan")
        lines.append(f"| {c} | {m / 1e6:.1f} | {st.median:.3f} | {cpu:.3f} | {m / st.median / 1e6:.1f} "
                     f"| {m / cpu / 1e6:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    return (f"{cpu}, nproc {nproc}, load average {load:.2f} at start; torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, provider CPUExecutionProvider")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | group sparsity | MACs dense (G) | MACs pruned (G) | MACs ratio | dense ms (median / p90, runs) "
        "| pruned ms (median / p90, runs) | measured speedup | ideal (MACs) speedup | **quotient** "
        "| CPU ms dense / pruned | CPU-time speedup | CPU-time quotient |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        d, p = r["dense"], r["pruned"]
        cpu = d["cpu_median"] / p["cpu_median"]
        lines.append(
            f"| {r['model']} | {r['group_sparsity']:.3f} | {r['dense_macs'] / 1e9:.3f} | {r['pruned_macs'] / 1e9:.3f} "
            f"| {r['pruned_macs'] / r['dense_macs']:.3f} | {d['median']:.2f} / {d['p90']:.2f}, {d['runs']} "
            f"| {p['median']:.2f} / {p['p90']:.2f}, {p['runs']} | {r['measured_speedup']:.2f}x "
            f"| {r['macs_speedup']:.2f}x | **{r['quotient']:.2f}** | {d['cpu_median']:.2f} / {p['cpu_median']:.2f} "
            f"| {cpu:.2f}x | {cpu / r['macs_speedup']:.2f} |")
    return "\n".join(lines)


def op_table(r: dict[str, Any], top: int = 8) -> str:
    """Where the gap to the ideal is: per node, time beyond `dense time x MACs ratio` of that node."""
    dn, pn = r["nodes_dense"], r["nodes_pruned"]
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, d in dn.items():
        by_op[d["op"]][0] += d["ms"]
        by_op[d["op"]][1] += pn.get(name, {}).get("ms", 0.0)
    for name, p in pn.items():
        if name not in dn:
            by_op[p["op"]][1] += p["ms"]
    td, tp = sum(v[0] for v in by_op.values()), sum(v[1] for v in by_op.values())
    lines = [f"**{r['model']}**, ORT profiler, median ms per run by op type (fused Conv+Add+Relu count as Conv):", "",
             "| op | dense ms | pruned ms | speedup |", "| --- | ---: | ---: | ---: |"]
    for op, (a, b) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {op} | {a:.2f} | {b:.2f} | {a / b if b else float('inf'):.2f}x |")
    lines.append(f"| total | {td:.2f} | {tp:.2f} | {td / max(tp, 1e-9):.2f}x |")
    rows = []
    for name, d in dn.items():
        p = pn.get(name)
        if not p or not d["macs"] or not p["macs"]:
            continue
        ideal_ms = d["ms"] * p["macs"] / d["macs"]
        rows.append((p["ms"] - ideal_ms, name, d, p, ideal_ms))
    rows.sort(key=lambda t: -t[0])
    gap = sum(t[0] for t in rows)
    lines += ["", f"Conv/Gemm nodes furthest from their own MACs ratio (total excess {gap:.2f} ms of "
              f"{tp:.2f} ms; dense GMAC/s vs pruned GMAC/s shows the kernel efficiency change):", "",
              "| node | dense ms | pruned ms | MACs ratio | time ratio | excess ms | GMAC/s dense -> pruned |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for excess, name, d, p, _ in rows[:top]:
        lines.append(
            f"| {name.removesuffix('_nchwc')} | {d['ms']:.2f} | {p['ms']:.2f} | {p['macs'] / d['macs']:.2f} "
            f"| {p['ms'] / d['ms']:.2f} | {excess:.2f} | {d['macs'] / d['ms'] / 1e6:.1f} -> "
            f"{p['macs'] / p['ms'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (fixed for dense and pruned)")
    ap.add_argument("--seconds", type=float, default=60.0, help="max seconds of timing per model pair")
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    ap.add_argument("--channel-multiple", type=int, default=None,
                    help="round kept channels to this instead of the cpu profile's 8 (investigation)")
    ap.add_argument("--profile-ops", action="store_true", help="also break latency down by ONNX op type")
    ap.add_argument("--width-sweep", action="store_true", help="also time one conv across channel counts")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here")
    ap.add_argument("--json", type=Path, default=None, help="raw results as JSON")
    args = ap.parse_args()
    global PROFILE
    if args.channel_multiple:
        PROFILE = resolve_profile({"name": f"cpu-x{args.channel_multiple}", "channel_multiple": args.channel_multiple})
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mach = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            print(f"== {name}", file=sys.stderr)
            rows.append(bench_model(name, args.threads, args.seconds, args.allocation, args.profile_ops,
                                    Path(tmp)))
            print(table(rows[-1:]), file=sys.stderr)
    cmd = "python bench/speedup.py " + " ".join(sys.argv[1:])
    md = [f"Date: {started}. Machine: {mach}. ORT threads: {args.threads} (intra-op), sequential, "
          f"all graph optimisations. Allocation: {args.allocation}, profile {PROFILE.name} (channel multiple "
          f"{PROFILE.channel_multiple}). Command: `{cmd}`", "", table(rows)]
    if args.profile_ops:
        md += ["", *[op_table(r) + "\n" for r in rows]]
    if args.width_sweep:
        with tempfile.TemporaryDirectory() as tmp:
            md += ["", width_sweep(args.threads, args.seconds, Path(tmp))]
    text = "\n".join(md)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
