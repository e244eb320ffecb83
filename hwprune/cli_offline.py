"""Offline commands: `hwprune prune` (one job in-process, no server) and `hwprune bench` (ONNX Runtime latency)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from pruning_core.accelerators import parse_block, parse_nm
from pruning_core.errors import HwpruneError
from pruning_core.progress import Progress
from pruning_core.spec import PruneSpec, parse_input_shape


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _accelerator(name: str | None, block: str | None, nm: str | None, channel_multiple: int | None) -> Any:
    """A profile name, or an inline profile from --block / --nm (at most one of the three)."""
    given = [v for v in (name, block, nm) if v]
    if len(given) > 1:
        raise HwpruneError("give one of --accelerator, --block or --nm")
    if block:
        return {"name": f"block-{block}", "block_shape": list(parse_block(block)),
                "channel_multiple": channel_multiple or 1}
    if nm:
        return {"name": f"nm-{nm}", "nm": list(parse_nm(nm)), "channel_multiple": channel_multiple or 1}
    return name or "cpu"


class _Bar:
    """A tqdm bar over the job's overall 0..1 progress, labelled with the current stage."""

    def __init__(self) -> None:
        self._bar: Any = None  # created on the first report, so input errors print alone

    @property
    def bar(self) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=1000, unit="‰", file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc:<10} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        return self._bar

    def __call__(self, stage: str, fraction: float, metrics: dict[str, Any]) -> None:
        self.bar.set_description_str(stage)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "step"}
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(max(0, int(fraction * 1000) - self.bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def prune(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX or TorchScript model")],
    out: Annotated[Path, typer.Option("--out", help="where to write the pruned ONNX")],
    report: Annotated[Path | None, typer.Option(help="where to write report.json (default: OUT with .json)")] = None,
    method: Annotated[str, typer.Option(help="smart | magnitude | 3d")] = "smart",
    granularity: Annotated[str | None, typer.Option(help="block | channel | nm (default: the profile's)")] = None,
    accelerator: Annotated[str | None, typer.Option(help="built-in profile name (see `hwprune profiles`)")] = None,
    block: Annotated[str | None, typer.Option(help="custom block shape RxC, e.g. 4x1")] = None,
    nm: Annotated[str | None, typer.Option(help="custom N:M pattern, e.g. 2:4")] = None,
    channel_multiple: Annotated[int | None, typer.Option(help="channel multiple for a custom profile")] = None,
    sparsity: Annotated[float | None, typer.Option(help="target sparsity (smart, magnitude)")] = None,
    flops: Annotated[float | None, typer.Option(help="kept FLOPs fraction (3d)")] = None,
    data: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help=".npz with inputs[, labels]")] = None,
    steps: Annotated[int, typer.Option(help="optimisation steps (pruning + fine-tuning)")] = 300,
    seed: Annotated[int, typer.Option()] = 0,
    input_shape: Annotated[str | None, typer.Option(help="e.g. 1,3,224,224 (required for TorchScript)")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads for the latency measurement")] = None,
    schedule: Annotated[str, typer.Option(help="magnitude: oneshot | gradual")] = "gradual",
    allocation: Annotated[str, typer.Option(help="magnitude: global | uniform")] = "global",
) -> None:
    """Prune one model in-process and write the pruned ONNX and its report."""
    from pruning_core.pipeline import PRUNED_ONNX, run_job

    bar: _Bar | None = None
    try:
        spec = PruneSpec(
            method=method, granularity=granularity, accelerator=_accelerator(accelerator, block, nm, channel_multiple),
            target_sparsity=None if method == "3d" else (sparsity if sparsity is not None else 0.5),
            flops_target=flops if method == "3d" else None, steps=steps, seed=seed,
            input_shape=parse_input_shape(input_shape) if input_shape else None,
            schedule=schedule, allocation=allocation,
        )
        bar = _Bar()
        with tempfile.TemporaryDirectory(prefix="hwprune-") as tmp:
            result = run_job(spec, model, Path(tmp), data, Progress(report=bar), threads=threads)
            bar.close()
            bar = None
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / PRUNED_ONNX, out)
        report_path = report or out.with_suffix(".json")
        report_path.write_text(json.dumps(result, indent=2))
    except HwpruneError as e:
        if bar is not None:
            bar.close()
        _fail(str(e))
        return
    lat = result["latency_ms"]
    typer.echo(f"pruned model: {out}\nreport:       {report_path}")
    if spec.method == "3d":
        plan = result["plan3d"]
        budget = f"depth {plan['depth']:.2f}, width {plan['width']:.2f}, resolution {plan['resolution']:.2f} " \
                 f"(FLOPs target {spec.flops_target}); new input shape {plan['input_shape']}"
    else:
        budget = f"sparsity {result['achieved_sparsity']:.3f} (target {result['target_sparsity']})"
    typer.echo(f"{budget}, MACs {result['macs']['ratio']:.3f} of dense, latency {lat['dense']['median']:.3f} -> "
               f"{lat['pruned']['median']:.3f} ms (speedup x{result['speedup']:.2f}), "
               f"fidelity cosine {result['fidelity']['cosine']:.4f}")
    typer.echo(result["explain"]["summary"])


def bench(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX or TorchScript model")],
    input_shape: Annotated[str | None, typer.Option(help="e.g. 1,3,224,224 (default: the model's, batch 1)")] = None,
    threads: Annotated[int | None, typer.Option(help="intra-op threads (default: physical cores)")] = None,
    max_seconds: Annotated[float, typer.Option(help="time budget for the measurement")] = 20.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the stats as JSON")] = False,
) -> None:
    """Latency of a model on ONNX Runtime: warm-up, then runs until the median is stable."""
    from pruning_core.ingest import detect_format, inspect_model
    from pruning_core.latency import measure_latency

    try:
        shape = parse_input_shape(input_shape) if input_shape else None
        fmt = detect_format(model)
        with tempfile.TemporaryDirectory(prefix="hwprune-bench-") as tmp:
            onnx_path = model
            if fmt == "torchscript":  # ONNX Runtime runs ONNX: convert the same way the pipeline does
                from pruning_core.export import export_onnx
                from pruning_core.ingest import load_model

                loaded = load_model(model, shape)
                onnx_path = Path(tmp) / "model.onnx"
                export_onnx(loaded.module, onnx_path, loaded.input_shape, loaded.input_names, loaded.output_names)
                shape = loaded.input_shape
            if shape is None:
                info = inspect_model(model)
                dims = info.inputs[0].shape
                shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims]
                if any(not isinstance(d, int) for d in dims[1:]):
                    raise HwpruneError(f"input {info.inputs[0].name} has symbolic dims {dims}: pass --input-shape")
            stats = measure_latency(onnx_path, shape, threads=threads, max_seconds=max_seconds)
    except HwpruneError as e:
        _fail(str(e))
        return
    if as_json:
        typer.echo(json.dumps({"input_shape": shape, **stats.to_dict()}))
    else:
        typer.echo(f"{model.name}: input {shape}, {stats.provider} x{stats.threads} threads, {stats.runs} runs: "
                   f"median {stats.median:.3f} ms, p90 {stats.p90:.3f} ms, mean {stats.mean:.3f} ms")


def profiles() -> None:
    """List the built-in accelerator profiles."""
    from pruning_core.accelerators import BUILTIN_PROFILES

    for p in BUILTIN_PROFILES.values():
        shape = (f"block {p.block_shape[0]}x{p.block_shape[1]}" if p.block_shape else
                 f"N:M {p.nm[0]}:{p.nm[1]}" if p.nm else "channels")
        typer.echo(f"{p.name:<10} {shape:<12} x{p.channel_multiple:<3} {p.description}")


def register(app: typer.Typer) -> None:
    app.command()(prune)
    app.command()(bench)
    app.command()(profiles)
