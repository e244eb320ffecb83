"""The job pipeline: ingest -> prune (SMART, magnitude or 3D) + fine-tune -> export -> measure -> report.

Split in two stages so the service can run them on different machines (DESIGN.md, "Workers"):
- `prune_stage` (heavy, the `gpu` queue): writes `dense.onnx`, `model.onnx` and `partial_report.json`;
- `measure_stage` (the `cpu` queue): ONNX Runtime latency of both files under identical settings, the
  `explain` text, and the final `report.json`.
`run_job` runs both in-process (the CLI's `hwprune prune`). Every stage reports progress and checks
for cancellation between optimisation steps.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning_core.data import TrainData, load_dataset, synthetic_data
from pruning_core.errors import HwpruneError
from pruning_core.fidelity import fidelity
from pruning_core.layer_stats import WEIGHT_LAYERS, effective_macs, layer_macs
from pruning_core.progress import Progress, StageProgress
from pruning_core.spec import PruneSpec
from pruning_core.train import TrainConfig, accuracy, predict

log = logging.getLogger(__name__)

DENSE_ONNX, PRUNED_ONNX = "dense.onnx", "model.onnx"
PARTIAL_REPORT, REPORT = "partial_report.json", "report.json"
HOLDOUT_FRACTION = 0.2  # held-out share of the user's data for fidelity/accuracy (never trained on)
MAX_HOLDOUT = 1024  # enough samples for stable fidelity numbers, bounded evaluation cost


def pick_device() -> torch.device:
    """CUDA on the GPU worker when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_config(spec: PruneSpec) -> TrainConfig:
    return TrainConfig(lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)


def _prepare_data(spec: PruneSpec, data_path: Path | None, input_shape: list[int]) -> tuple[TrainData, TrainData]:
    data = load_dataset(data_path, input_shape) if data_path is not None else synthetic_data(input_shape, spec.seed)
    train, held = data.split(HOLDOUT_FRACTION, seed=spec.seed)
    if len(held) > MAX_HOLDOUT:
        held = held.subset(torch.arange(MAX_HOLDOUT))
    return train, held


def _resize(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Inputs for a 3D-pruned model that takes a lower resolution (bilinear, as the report tells users)."""
    if list(x.shape[1:]) == list(shape[1:]):
        return x
    return F.interpolate(x, size=tuple(shape[2:]), mode="bilinear", align_corners=False)


def _prune(spec: PruneSpec, model: nn.Module, teacher: nn.Module, input_shape: list[int], train: TrainData,
           stage: StageProgress) -> dict[str, Any]:
    """Dispatch to the method; returns {"module", "input_shape", "layers", extra report sections}."""
    device = next(model.parameters()).device
    example = torch.zeros(input_shape, device=device)
    if spec.method == "3d":
        from pruning_core.methods.three_d.run import run_3d

        res3 = run_3d(model, teacher, input_shape, spec, train, stage)
        return {"module": res3.module, "input_shape": list(res3.input_shape),
                "layers": diff_layers(teacher, res3.module), "plan3d": res3.plan3d}
    from pruning_core.geometry import build_plan, require_prunable

    plan = build_plan(model, example, spec.resolved_granularity, spec.profile, spec.layers)
    require_prunable(plan)
    extra: dict[str, Any] = {}
    if spec.method == "smart":
        from pruning_core.methods.smart import run_smart

        res = run_smart(model, teacher, plan, spec, train, stage)
        module = res.module
        extra["training"] = {"history": res.history}
    else:
        from pruning_core.methods.magnitude import run_magnitude

        module = run_magnitude(model, teacher, plan, spec, train, stage)
    layers = [rec.to_dict() if hasattr(rec, "to_dict") else dict(vars(rec)) for rec in plan.layers]
    return {"module": module, "input_shape": list(input_shape), "layers": layers, **extra}


def diff_layers(dense: nn.Module, pruned: nn.Module) -> list[dict[str, Any]]:
    """Layer records for methods that reshape the network (3D): each dense weight layer, and what became of it."""
    after = {n: m for n, m in pruned.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    records = []
    for name, mod in dense.named_modules():
        if not isinstance(mod, WEIGHT_LAYERS):
            continue
        shape = list(mod.weight.shape)
        new = after.get(name)
        new_shape = list(new.weight.shape) if new is not None else None
        kept_weights = _numel(new_shape) if new_shape is not None else 0
        groups, kept = shape[0], (new_shape[0] if new_shape is not None else 0)
        reason = ("removed with its residual block (depth)" if new is None else
                  "output channels removed (width)" if new_shape is not None and new_shape[0] != shape[0] else
                  "input channels removed (width of the layer feeding it)" if new_shape != shape else "kept as is")
        records.append({"name": name, "op_type": type(mod).__name__, "weight_shape": shape, "pruned_shape": new_shape,
                        "prunable": new_shape != shape, "reason": reason, "groups": groups, "kept": kept,
                        "sparsity": 1.0 - kept_weights / _numel(shape)})
    return records


def achieved_sparsity(layers: list[dict[str, Any]]) -> float:
    """Removed groups over all groups of the pruned layers: the quantity the budget constrains.

    Groups are block tiles, single weights (N:M) or output channels; rounding to channel multiples and
    per-layer minimums make this differ slightly from the target.
    """
    groups = sum(int(ly.get("groups", 0)) for ly in layers if ly.get("prunable"))
    kept = sum(int(ly.get("kept", 0)) for ly in layers if ly.get("prunable"))
    return 1.0 - kept / groups if groups else 0.0


def weight_sparsity(layers: list[dict[str, Any]]) -> float:
    """Zero (or removed) weights over all weights of the prunable layers."""
    pruned = [ly for ly in layers if ly.get("prunable")]
    total = sum(_numel(ly["weight_shape"]) for ly in pruned)
    zeros = sum(_numel(ly["weight_shape"]) * float(ly.get("sparsity", 0.0)) for ly in pruned)
    return zeros / total if total else 0.0


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _target_sparsity(spec: PruneSpec) -> float | None:
    """3D has a FLOPs target instead; an N:M pattern fixes the sparsity at 1 - N/M whatever was asked."""
    if spec.method == "3d":
        return None
    nm = spec.profile.nm
    if spec.resolved_granularity == "nm" and nm is not None:
        return 1.0 - nm[0] / nm[1]
    return spec.target_sparsity


def warm_imports() -> None:
    """Import everything a job's stages load lazily (onnx, onnxruntime, onnx2torch with torchvision, onnxslim,
    Torch-Pruning): ~3 s on a quiet 2-core machine. A worker calls this when it starts; otherwise its first
    job pays it inside the job's heartbeat window: in a CI run of tests/service/test_faults.py (heartbeat stale
    after 4 s) a fresh worker's first job took 5.5 s instead of 0.15, its heartbeat thread wrote nothing for
    over 4 s, and the sweeper re-queued the job, which then ran twice."""
    import onnxruntime  # noqa: F401
    import onnxslim  # noqa: F401

    import pruning_core.accelerators
    import pruning_core.explain
    import pruning_core.export
    import pruning_core.geometry
    import pruning_core.ingest.onnx_loader
    import pruning_core.ingest.torchscript_loader
    import pruning_core.latency
    import pruning_core.macs
    import pruning_core.methods.magnitude
    import pruning_core.methods.smart
    import pruning_core.methods.three_d.run  # noqa: F401


def prune_stage(spec: PruneSpec, model_path: Path, work_dir: Path, data_path: Path | None,
                progress: Progress | None = None) -> dict[str, Any]:
    """Ingest, prune, fine-tune, export; returns (and writes) the partial report."""
    from pruning_core.export import export_onnx, zero_pattern_mismatches
    from pruning_core.ingest import load_model
    from pruning_core.macs import count_macs, count_params

    progress = progress or Progress()
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ingest = progress.stage("ingest", 0.0, 0.05)
    loaded = load_model(model_path, spec.input_shape)
    ingest(1.0, {"format": loaded.info.format})
    progress.check_cancel()
    torch.manual_seed(spec.seed)
    train, held = _prepare_data(spec, data_path, loaded.input_shape)
    device = pick_device()
    model = loaded.module.to(device).float()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    result = _prune(spec, model, teacher, loaded.input_shape, train, progress.stage("prune", 0.05, 0.9))
    pruned: nn.Module = result["module"].eval()
    pruned_shape: list[int] = result["input_shape"]

    evaluate = progress.stage("evaluate", 0.9, 0.95)
    teacher_cpu, pruned_cpu = teacher.cpu(), pruned.cpu()
    dense_out = predict(teacher_cpu, held.inputs)[0]
    pruned_out = predict(pruned_cpu, _resize(held.inputs, pruned_shape))[0]
    fid = fidelity(dense_out, pruned_out)
    acc = None
    if held.labels is not None:
        held_pruned = TrainData(_resize(held.inputs, pruned_shape), held.labels, held.source, held.description)
        acc = {"dense": accuracy(teacher_cpu, held), "pruned": accuracy(pruned_cpu, held_pruned),
               "samples": len(held)}
    evaluate(1.0)
    progress.check_cancel()

    export = progress.stage("export", 0.95, 1.0)
    for module, name, shape in ((teacher_cpu, DENSE_ONNX, loaded.input_shape), (pruned_cpu, PRUNED_ONNX, pruned_shape)):
        export_onnx(module, work_dir / name, shape, loaded.input_names, loaded.output_names, loaded.dynamic_batch)
        export(0.5)
    gran = spec.resolved_granularity
    if spec.method != "3d" and gran in ("block", "nm"):
        bad = zero_pattern_mismatches(pruned_cpu, work_dir / PRUNED_ONNX)
        if bad:  # an exporter that re-packs weights would silently break the accelerator contract
            raise HwpruneError(f"the exported ONNX lost the {gran} zero pattern in {bad[:3]}")
    export(1.0)

    x_dense, x_pruned = torch.zeros(loaded.input_shape), torch.zeros(pruned_shape)
    dense_macs, pruned_macs = count_macs(teacher_cpu, x_dense), count_macs(pruned_cpu, x_pruned)
    per_layer = layer_macs(teacher_cpu, x_dense)  # dense MACs per layer: what a sparse engine could skip from
    for ly in result["layers"]:
        ly["macs"] = per_layer.get(ly["name"], 0)
    report: dict[str, Any] = {
        "model": {**loaded.info.to_dict(), "input_shape": loaded.input_shape},
        "method": spec.method,
        "granularity": gran if spec.method != "3d" else "channel+depth+resolution",
        "accelerator": spec.profile.to_dict(),
        "target_sparsity": _target_sparsity(spec),
        "flops_target": spec.flops_target,
        "achieved_sparsity": achieved_sparsity(result["layers"]),
        "weight_sparsity": weight_sparsity(result["layers"]),
        "layers": result["layers"],
        "macs": {"dense": dense_macs, "pruned": pruned_macs,
                 "effective": effective_macs(pruned_cpu, x_pruned), "ratio": pruned_macs / max(dense_macs, 1)},
        "params": {"dense": count_params(teacher_cpu), "pruned": count_params(pruned_cpu),
                   "nonzero": int(sum(int((p != 0).sum()) for p in pruned_cpu.parameters()))},
        "fidelity": {**fid, "samples": len(held), "inputs": held.source},
        "accuracy": acc,
        "data": {"source": train.source, "description": train.description, "train_samples": len(train),
                 "heldout_samples": len(held), "steps": spec.steps, "seed": spec.seed, "device": str(device)},
        "input_shape": {"dense": loaded.input_shape, "pruned": pruned_shape},
        "spec": spec.to_dict(),
        "timing_s": {"prune_stage": round(time.perf_counter() - t0, 3)},
        **{k: v for k, v in result.items() if k in ("plan3d", "training")},
    }
    if pruned_shape != loaded.input_shape:
        report["input_resize_required"] = (
            f"the pruned model takes inputs of shape {pruned_shape} instead of {loaded.input_shape}: "
            "resize your inputs (bilinear) before calling it")
    (work_dir / PARTIAL_REPORT).write_text(json.dumps(report, indent=2))
    return report


def measure_stage(work_dir: Path, progress: Progress | None = None, threads: int | None = None) -> dict[str, Any]:
    """Latency of dense vs pruned on ONNX Runtime (same provider, threads, interleaved) and the final report."""
    from pruning_core.explain import explain
    from pruning_core.latency import measure_pair

    progress = progress or Progress()
    stage = progress.stage("measure", 0.0, 1.0)
    report = json.loads((work_dir / PARTIAL_REPORT).read_text())
    t0 = time.perf_counter()
    dense, pruned = measure_pair(work_dir / DENSE_ONNX, work_dir / PRUNED_ONNX, report["input_shape"]["dense"],
                                 report["input_shape"]["pruned"], threads=threads,
                                 max_seconds=float(report["spec"]["latency_seconds"]))
    stage(0.9)
    report["latency_ms"] = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    report["speedup"] = dense.median / pruned.median if pruned.median > 0 else None
    report["explain"] = explain(report["spec"]["granularity"] or report["granularity"],
                                _profile_of(report), report["layers"], report["macs"], report["latency_ms"],
                                dense.provider)
    report["timing_s"]["measure_stage"] = round(time.perf_counter() - t0, 3)
    (work_dir / REPORT).write_text(json.dumps(report, indent=2))
    stage(1.0, {"speedup": report["speedup"]})
    return report


def _profile_of(report: dict[str, Any]) -> Any:
    from pruning_core.accelerators import resolve_profile

    acc = report["accelerator"]
    return resolve_profile({k: acc[k] for k in ("name", "block_shape", "nm", "channel_multiple", "description")})


def run_job(spec: PruneSpec, model_path: Path, work_dir: Path, data_path: Path | None = None,
            progress: Progress | None = None, threads: int | None = None) -> dict[str, Any]:
    """Both stages in-process: what `hwprune prune` runs."""
    progress = progress or Progress()
    prune_progress = Progress(report=lambda s, f, m: progress.report(s, 0.85 * f, m), cancelled=progress.cancelled)
    prune_stage(spec, model_path, work_dir, data_path, prune_progress)
    measure_progress = Progress(report=lambda s, f, m: progress.report(s, 0.85 + 0.15 * f, m),
                                cancelled=progress.cancelled)
    return measure_stage(work_dir, measure_progress, threads=threads)
