"""How should global magnitude pruning compare groups across layers? A measurement on the digits CNN.

Compares, from the same dense weights and with the same fine-tuning budget (distillation + labels):
uniform allocation, global ranking of raw RMS group norms (`score_norm="rms"`), and global ranking of
layer-relative RMS (`score_norm="layer"`, each unit's scores divided by their mean), for one-shot and
gradual (cubic) schedules, block 4x4 and channel granularity. Prints a markdown table of test accuracy and
fidelity (relative L2 error of the logits against the dense model).

    python -m bench.magnitude_scores [--steps 200] [--lr 1e-3] [--seeds 0 1] [--out docs/benchmarks/magnitude.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.digits import accuracy, load_digits_split, logits, rel_l2, small_cnn, train_dense
from pruning_core.data import TrainData
from pruning_core.geometry import build_plan
from pruning_core.methods.magnitude import MagnitudeConfig, run_magnitude
from pruning_core.spec import PruneSpec

VARIANTS = [("uniform", "layer"), ("global", "rms"), ("global", "layer")]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9, 0.95])
    ap.add_argument("--lr", type=float, default=1e-3)  # PruneSpec's default fine-tuning lr
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_digits_split()
    dense = train_dense(small_cnn(), split, steps=600, seed=0)
    dense_logits = logits(dense, split.x_test)
    train = TrainData(split.x_train, split.y_train, "labelled", "digits train split")
    rows = [f"dense model: test accuracy {accuracy(dense, split.x_test, split.y_test):.4f}", "",
            "| granularity | sparsity | schedule | allocation | score_norm | accuracy (mean ± sd) "
            "| rel_l2 (mean ± sd) | s/run |", "|---|---|---|---|---|---|---|---|"]
    for gran, accel in [("block", "npu-4x4"), ("channel", "cpu")]:
        for sp in args.sparsities:
            for schedule in ("oneshot", "gradual"):
                for allocation, norm in VARIANTS:
                    accs, errs, secs = [], [], []
                    for seed in args.seeds:
                        model = copy.deepcopy(dense)
                        spec = PruneSpec(method="magnitude", granularity=gran, accelerator=accel, target_sparsity=sp,
                                         steps=args.steps, batch_size=64, lr=args.lr, seed=seed, schedule=schedule,
                                         allocation=allocation, min_keep=0.05)
                        t0 = time.perf_counter()
                        plan = build_plan(model, split.example_input, gran, spec.profile)
                        pruned = run_magnitude(model, dense, plan, spec, train, config=MagnitudeConfig(score_norm=norm))
                        secs.append(time.perf_counter() - t0)
                        accs.append(accuracy(pruned, split.x_test, split.y_test))
                        errs.append(rel_l2(logits(pruned, split.x_test), dense_logits))
                    rows.append(f"| {gran} | {sp} | {schedule} | {allocation} | {norm} | "
                                f"{statistics.mean(accs):.4f} ± {sd(accs):.4f} | {statistics.mean(errs):.3f} ± "
                                f"{sd(errs):.3f} | {statistics.mean(secs):.1f} |")
                    print(rows[-1], flush=True)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    head = ["# Magnitude baseline: score normalisation for global allocation", "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {nproc} cores, {_cpu()}; torch threads 1",
            f"- command: `python -m bench.magnitude_scores --steps {args.steps} --lr {args.lr} --seeds "
            f"{' '.join(map(str, args.seeds))} --sparsities {' '.join(map(str, args.sparsities))}`",
            f"- digits CNN (bench/digits.py small_cnn, BN), dense 600 steps; {args.steps} fine-tuning steps "
            f"(CE + distillation, Adam lr {args.lr}), batch 64, min_keep 0.05; seeds vary fine-tuning only", ""]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
