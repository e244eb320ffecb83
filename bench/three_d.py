"""3D pruning vs single-dimension pruning at the same FLOPs and the same fine-tuning budget (issue 5).

A small ResNet (6 removable residual blocks, BatchNorm, global pooling) is trained on scikit-learn's digits
upsampled to 32x32, exported to ONNX and converted back with onnx2torch (the path uploaded models take).
For each FLOPs target, four ways to reach it, each followed by the same final fine-tuning (steps, lr, data):
  3d          run_3d: per-axis chains -> rank-1 polynomial -> best (d, w, r) with real MACs under the budget
  width-only  one kept-channel ratio (the largest whose real MACs fit)
  depth-only  remove the most removable blocks (branch-norm criterion) until the MACs fit
  resolution  the largest input size whose MACs fit
3D's sampling chains cost extra fine-tuning steps, reported separately (they are shared by both targets).

Run: `python -m bench.three_d` (full: 3 seeds, targets 0.5 and 0.25) or `python -m bench.three_d --quick`.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnx2torch
import onnxslim
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from bench.digits import DigitsSplit, accuracy, load_digits_split, train_dense
from pruning_core.data import TrainData
from pruning_core.methods.three_d.run import PreSampled, ThreeDConfig, run_3d
from pruning_core.methods.three_d.sampling import ChainConfig
from pruning_core.spec import PruneSpec

SIZE = 32
METHODS = ("3d", "width-only", "depth-only", "resolution-only")
AXES = {"width-only": ("width",), "depth-only": ("depth",), "resolution-only": ("resolution",)}


class Block(nn.Module):
    """Basic residual block with an identity skip: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.f(x))


class Down(nn.Module):
    """Strided block with a 1x1 projection skip (not removable)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                               nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b))
        self.proj = nn.Sequential(nn.Conv2d(a, b, 1, stride=2, bias=False), nn.BatchNorm2d(b))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.proj(x) + self.f(x))


class DigitsResNet(nn.Module):
    """ResNet-14-like for 32x32: stem, 3 stages (c, 2c, 4c) of Down? + 2 Blocks, global pool, Linear."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.Sequential(Block(c), Block(c), Down(c, 2 * c), Block(2 * c), Block(2 * c),
                                  Down(2 * c, 4 * c), Block(4 * c), Block(4 * c))
        self.fc = nn.Linear(4 * c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(self.stem(x)).mean(dim=(2, 3)))


def to_converted(model: nn.Module, example: Tensor) -> fx.GraphModule:
    """Export to ONNX (BN folds into the convs) and convert back, as an uploaded model would be."""
    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=17, input_names=["input"],  # type: ignore[arg-type]
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx2torch.convert(onnxslim.slim(onnx.load_from_string(buf.getvalue())))


@dataclass
class Settings:
    seeds: list[int]
    targets: list[float]
    width: int = 8  # stem channels (stages 8/16/32): ~7.8M MACs, ~0.09 s per training step on 1 core
    dense_steps: int = 500
    final_steps: int = 300  # fine-tuning of every final model (all methods)
    chain_steps: int = 30  # 3D only: fine-tuning after each chain step
    lr: float = 1e-3
    batch_size: int = 32
    channel_multiple: int = 2  # inline accelerator: the small model's 8-channel groups stay prunable
    results: list[dict[str, Any]] = field(default_factory=list)


def test_accuracy(module: nn.Module, shape: list[int], split: DigitsSplit) -> float:
    x = split.x_test
    if list(x.shape[2:]) != shape[2:]:
        x = F.interpolate(x, size=tuple(shape[2:]), mode="bilinear", align_corners=False)
    return accuracy(module, x, split.y_test)


def run_seed(seed: int, st: Settings, split: DigitsSplit) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    dense = train_dense(DigitsResNet(st.width), split, steps=st.dense_steps, seed=seed)
    gm = to_converted(dense, split.example_input)
    dense_acc = test_accuracy(gm, [1, 1, SIZE, SIZE], split)
    data = TrainData(split.x_train, split.y_train, "labelled", "digits 32x32 train split")
    rows: list[dict[str, Any]] = []
    pre: PreSampled | None = None
    chain_cost = 0
    for target in st.targets:
        for method in METHODS:
            spec = PruneSpec(method="3d", flops_target=target, steps=st.final_steps, seed=seed, lr=st.lr,
                             batch_size=st.batch_size, accelerator={"channel_multiple": st.channel_multiple})
            if method == "3d":
                cfg = ThreeDConfig(chains=ChainConfig(steps_per_point=st.chain_steps), presampled=pre)
            else:
                cfg = ThreeDConfig(axes=AXES[method], search="macs")
            t0 = time.perf_counter()
            try:
                res = run_3d(gm, gm, [1, 1, SIZE, SIZE], spec, data, None, cfg)
            except Exception as e:  # a single-axis method may be unable to reach the target at all
                rows.append({"seed": seed, "target": target, "method": method, "error": str(e)})
                print(f"seed {seed} target {target} {method}: {e}", flush=True)
                continue
            wall = time.perf_counter() - t0
            p = res.plan3d
            row = {
                "seed": seed, "target": target, "method": method, "dense_acc": dense_acc,
                "acc": test_accuracy(res.module, res.input_shape, split), "kept_macs": p["macs"]["kept_fraction"],
                "d": p["depth"], "w": p["width"], "r": p["resolution"], "input": res.input_shape[2], "wall_s": wall,
                "blocks_removed": len(p["blocks"]["removed"]),
            }
            if method == "3d":
                if pre is None:
                    pre = res.presampled
                    points = len(p["samples"]) - 1 + len(p["holdout"])
                    chain_cost = points * st.chain_steps
                row.update(predicted=p["predicted"], achieved_val=p["achieved"], chain_steps=chain_cost,
                           fit_rmse=p["fit_error"]["heldout"]["rmse"], fit_train_rmse=p["fit_error"]["train"]["rmse"],
                           samples=p["samples"], holdout=p["holdout"], poly=p["model"])
            rows.append(row)
            print(f"seed {seed} target {target} {method:16s} acc {row['acc']:.4f} kept {row['kept_macs']:.3f} "
                  f"d {row['d']:.2f} w {row['w']:.2f} r {row['r']:.2f} ({wall:.0f}s)", flush=True)
    return rows


def _ms(v: list[float]) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


def table(rows: list[dict[str, Any]], targets: list[float], final_steps: int) -> str:
    lines = ["| FLOPs target | method | test accuracy | kept MACs | d | w | r (input) | final ft steps | extra steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        for m in METHODS:
            rs = [r for r in rows if r["target"] == t and r["method"] == m and "acc" in r]
            errs = [r for r in rows if r["target"] == t and r["method"] == m and "error" in r]
            if not rs:
                lines.append(f"| {t} | {m} | cannot reach: {errs[0]['error'] if errs else '?'} | | | | | | |")
                continue
            mean = statistics.mean
            inputs = sorted({r["input"] for r in rs})
            lines.append(
                f"| {t} | {m} | {_ms([r['acc'] for r in rs])} | {mean([r['kept_macs'] for r in rs]):.3f} | "
                f"{mean([r['d'] for r in rs]):.2f} | {mean([r['w'] for r in rs]):.2f} | "
                f"{mean([r['r'] for r in rs]):.2f} ({'/'.join(map(str, inputs))}) | {final_steps} | "
                f"{rs[0].get('chain_steps', 0)} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"nproc {nproc}, {cpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, target 0.5, few steps: a smoke run")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--targets", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = Settings(seeds=args.seeds, targets=args.targets)
    if args.quick:
        st = Settings(seeds=[0], targets=[0.5], dense_steps=100, final_steps=20, chain_steps=4)
    split = load_digits_split(size=SIZE, seed=0)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in st.seeds:
        rows += run_seed(seed, st, split)
    wall = time.perf_counter() - t0
    md = report(rows, st, wall, args)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


def report(rows: list[dict[str, Any]], st: Settings, wall: float, args: argparse.Namespace) -> str:
    cmd = "python -m bench.three_d" + (" --quick" if args.quick else "")
    dense = [r["dense_acc"] for r in rows if r["method"] == "3d" and r["target"] == st.targets[0] and "acc" in r]
    three = [r for r in rows if r["method"] == "3d" and "acc" in r]
    out = [
        "# 3D pruning vs single-dimension pruning (digits 32x32, small ResNet)", "",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}. Machine: {machine()}, "
        f"torch threads {args.threads}. Command: `{cmd}`. Wall time: {wall / 60:.1f} min.", "",
        f"Model: DigitsResNet(c={st.width}) (stem + 3 stages, 6 removable residual blocks), trained "
        f"{st.dense_steps} steps, exported to ONNX and converted back with onnx2torch. Dense test accuracy: "
        f"{_ms(dense)}. Seeds {st.seeds} (dense training, pruning and fine-tuning all vary with the seed; the "
        "test split is fixed). Every final model is fine-tuned "
        f"{st.final_steps} steps (Adam lr {st.lr}, batch {st.batch_size}, CE + logit-matching distillation from the "
        "dense model, BatchNorm statistics re-estimated after training) "
        "on the same 80% of the train split; accuracy is on the fixed 450-image test split, inputs resized to "
        "the model's input size. Channel multiple "
        f"{st.channel_multiple}. 'extra steps' = 3D's chain/held-out fine-tuning ({st.chain_steps} steps per "
        "point), spent once per seed and shared by both targets.", "",
        table(rows, st.targets, st.final_steps), "",
    ]
    if three:
        out += ["## 3D details (per seed and target)", "",
                "| seed | target | (d, w, r) | kept MACs | predicted val score | achieved val score | test acc | "
                "fit rmse held-out | fit rmse train |", "|---|---|---|---|---|---|---|---|---|"]
        for r in three:
            out.append(f"| {r['seed']} | {r['target']} | ({r['d']:.2f}, {r['w']:.2f}, {r['r']:.2f}) | "
                       f"{r['kept_macs']:.3f} | {r['predicted']:.4f} | {r['achieved_val']:.4f} | {r['acc']:.4f} | "
                       f"{r['fit_rmse']:.4f} | {r['fit_train_rmse']:.4f} |")
        out += ["", "Samples of seed " + str(three[0]["seed"]) + " (axis: d, w, r, kept MACs, val score):", ""]
        dense_macs = max(s["macs"] for s in three[0]["samples"])
        for s in three[0]["samples"] + three[0]["holdout"]:
            out.append(f"- {s['axis']}: d {s['d']:.2f}, w {s['w']:.2f}, r {s['r']:.2f}, "
                       f"MACs {s['macs'] / dense_macs:.3f}, score {s['score']:.4f}")
        out += ["", f"Fitted model (seed {three[0]['seed']}): `{three[0]['poly']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
