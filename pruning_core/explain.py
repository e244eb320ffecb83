"""Why the pruned model is (or is not) faster: the measured runtime, and a stated cost model for the target.

Runtimes only get faster from work they actually skip:
- `channel` (and 3D width/depth/resolution) physically shrinks the GEMMs, so any dense runtime speeds up;
  the ideal on compute-bound hardware is dense MACs / pruned MACs, and the quotient measured / ideal says
  how much of it the runtime realised (non-GEMM ops, memory-bound depthwise layers and per-op overhead
  do not shrink with the MAC count).
- `block` keeps every tensor's shape; dense CPU/GPU kernels multiply the zero tiles like any other number,
  so the measured speedup is ~1. A block-sparse engine (the profile's NPU) skips all-zero R x C tiles:
  cost model `layer time ~ kept MACs * (1 + t / (R*C))`, t = `block_tile_overhead_macs` MAC-equivalents per
  kept tile for its index/pointer (small tiles pay relatively more), dense layers at full cost.
- `nm` likewise runs dense on ORT CPU and the CUDA EP; N:M-sparse tensor cores (Ampere+, 2:4, via TensorRT
  with sparsity enabled) execute an N:M layer's GEMM in `N/M + o` of its dense time, o = metadata overhead
  (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks": up to 2x on the GEMM part).
Only Conv/Linear MACs are modelled; pooling, activations and adds are assumed negligible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pruning_core.accelerators import AcceleratorProfile


@dataclass(frozen=True)
class CostModel:
    block_tile_overhead_macs: float = 1.0  # per kept tile: index decode + pointer fetch, in MAC-equivalents
    nm_metadata_overhead: float = 0.05  # fraction of dense GEMM time an N:M layer pays for its index metadata
    noise_band: float = 0.05  # |measured speedup - 1| below this is "no measurable change"
    good_quotient: float = 0.9  # measured / ideal at or above this: the runtime realised the saving


def _f(x: float) -> str:
    return f"{x:.2f}x"


def _layer_macs(layers: list[dict[str, Any]], macs: dict[str, Any]) -> tuple[list[float] | None, float]:
    """Per-layer dense MACs when the report carries them (`layer["macs"]`), and the MACs outside those layers."""
    if layers and all(isinstance(ly.get("macs"), (int, float)) for ly in layers):
        per = [float(ly["macs"]) for ly in layers]
        return per, max(float(macs.get("dense", 0)) - sum(per), 0.0)
    return None, 0.0


def _block_estimate(
    profile: AcceleratorProfile, layers: list[dict[str, Any]], macs: dict[str, Any], cm: CostModel
) -> tuple[float, str, list[dict[str, Any]]]:
    assert profile.block_shape is not None
    r, c = profile.block_shape
    over = cm.block_tile_overhead_macs / (r * c)
    model = (f"block-sparse engine skips all-zero {r}x{c} tiles: layer time ~ kept MACs x (1 + {over:.3f}) "
             f"({cm.block_tile_overhead_macs:g} MAC-equivalent per kept tile for its index), "
             "unpruned layers at dense cost")
    per, other = _layer_macs(layers, macs)
    details: list[dict[str, Any]] = []
    dense = float(macs.get("dense", 0))
    if per is not None:
        cost = other
        for ly, m in zip(layers, per, strict=True):
            kept = 1.0 - float(ly.get("sparsity", 0.0))
            c_l = m * kept * (1 + over) if ly.get("prunable") and kept < 1.0 else m
            cost += c_l
            details.append({"layer": ly["name"], "macs": int(m), "sparsity": round(1 - kept, 4),
                            "estimated_cost_fraction": round(c_l / m, 4) if m else 1.0})
        dense = sum(per) + other
        return dense / max(cost, 1.0), model + "; per-layer MACs from the report", details
    eff = float(macs.get("effective", dense))
    cost = eff * (1 + over)  # overhead charged on all kept MACs: a slight underestimate of the speedup
    return dense / max(cost, 1.0), model + "; from the model's total effective (non-zero) MACs", details


def _nm_estimate(
    profile: AcceleratorProfile, layers: list[dict[str, Any]], macs: dict[str, Any], cm: CostModel
) -> tuple[float, str, list[dict[str, Any]]]:
    assert profile.nm is not None
    n, m_ = profile.nm
    frac = n / m_ + cm.nm_metadata_overhead
    model = (f"N:M sparse tensor cores run an {n}:{m_} layer's GEMM in {n}/{m_} + {cm.nm_metadata_overhead:g} "
             f"= {frac:.2f} of its dense time (metadata overhead), other layers at dense cost")
    per, other = _layer_macs(layers, macs)
    dense = float(macs.get("dense", 0))
    details: list[dict[str, Any]] = []
    if per is not None:
        cost = other
        for ly, m in zip(layers, per, strict=True):
            sparse = bool(ly.get("prunable")) and float(ly.get("sparsity", 0.0)) > 0
            c_l = m * frac if sparse else m
            cost += c_l
            details.append({"layer": ly["name"], "macs": int(m), "nm_sparse": sparse,
                            "estimated_cost_fraction": round(c_l / m, 4) if m else 1.0})
        return (sum(per) + other) / max(cost, 1.0), model + "; per-layer MACs from the report", details
    # without per-layer MACs: the skipped MACs (dense - effective) are (1 - N/M) of the N:M layers' MACs
    nm_macs = max(dense - float(macs.get("effective", dense)), 0.0) / (1 - n / m_)
    cost = dense - nm_macs + nm_macs * frac
    return dense / max(cost, 1.0), model + "; N:M layers' MACs inferred from the effective MACs", details


def explain(
    granularity: str, profile: AcceleratorProfile, layers: list[dict[str, Any]], macs: dict[str, Any],
    latency: dict[str, Any], provider: str, cost: CostModel | None = None,
) -> dict[str, Any]:
    """`{"summary", "measured_speedup", "estimated_accelerator_speedup", "cost_model", "details", ...}`.

    `layers` are report layer records (name, prunable, sparsity, optionally dense `macs`), `macs` the
    report's `{"dense", "pruned", "effective"?}`, `latency` the report's `{"dense": {...}, "pruned": {...}}`.
    """
    cm = cost or CostModel()
    d_ms, p_ms = float(latency["dense"]["median"]), float(latency["pruned"]["median"])
    threads = latency["dense"].get("threads")
    measured = d_ms / p_ms if p_ms > 0 else float("nan")
    dense_macs, pruned_macs = float(macs.get("dense", 0)), float(macs.get("pruned", 0))
    ideal = dense_macs / pruned_macs if pruned_macs > 0 else float("nan")
    where = f"{provider} with {threads} thread(s)" if threads else provider
    ran = f"On {where} the pruned model ran in {p_ms:.3g} ms vs {d_ms:.3g} ms dense ({_f(measured)})."
    unchanged = abs(measured - 1.0) < cm.noise_band
    g = granularity.lower()
    out: dict[str, Any] = {"granularity": granularity, "accelerator": profile.name, "provider": provider,
                           "measured_speedup": round(measured, 4), "macs_ratio_speedup": round(ideal, 4)}
    details: list[dict[str, Any]] = []

    if g == "block" or g == "nm":
        nm_text = f"{profile.nm[0]}:{profile.nm[1]}" if profile.nm else "N:M"
        what = "zero weight blocks" if g == "block" else f"the {nm_text} zeros"
        why = (f"{'Block' if g == 'block' else 'N:M'} pruning keeps every weight tensor's shape and stores the "
               f"zeros explicitly; {provider} runs dense kernels that multiply the zeros like any other value, "
               f"so it cannot skip {what}")
        why += (" and no speedup is expected here (the difference is within measurement noise)."
                if unchanged else f"; the {_f(measured)} difference comes from measurement noise or "
                "memory effects, not from skipped work.")
        if g == "nm" and provider == "TensorrtExecutionProvider":
            why += " TensorRT only uses sparse tensor cores when its sparsity option is enabled on Ampere+ GPUs."
        if g == "block" and profile.block_shape is not None:
            est, model, details = _block_estimate(profile, layers, macs, cm)
            target = f"On {profile.name} ({profile.description}) the cost model estimates {_f(est)}."
        elif g == "nm" and profile.nm is not None:
            est, model, details = _nm_estimate(profile, layers, macs, cm)
            target = (f"On {profile.name} ({profile.description}) the cost model estimates {_f(est)} "
                      "end to end (only the GEMM part gets faster).")
        else:
            est, model = 1.0, f"profile {profile.name} has no {g} support: it runs the zeros densely"
            target = (f"The {profile.name} profile has no {'block' if g == 'block' else 'N:M'} sparse engine, "
                      "so no speedup is expected on its hardware either.")
        summary = f"{ran} {why} {target}"
    else:  # channel, and 3D (channel+depth+resolution): the graph itself got smaller
        est = ideal
        model = "dense hardware, compute-bound: time ~ Conv/Linear MACs, so speedup = dense MACs / pruned MACs"
        quotient = measured / ideal if ideal > 0 else float("nan")
        out["quotient"] = round(quotient, 4)
        what = ("Channels were physically removed" if g == "channel" else
                f"The network itself got smaller ({granularity}: channels, blocks or input resolution removed)")
        why = (f"{what}, so every runtime executes smaller GEMMs: MACs fell "
               f"{_f(ideal)}, and the runtime realised {quotient:.0%} of that.")
        if quotient < cm.good_quotient:
            why += (" The gap comes from work that does not shrink with the MAC count: pooling, activations "
                    "and residual adds, memory-bound (depthwise, 1x1 on small maps) layers, fixed per-op "
                    "overhead, and GEMM kernels that are less efficient at odd or small channel counts.")
        summary = f"{ran} {why} On {profile.name} the estimate is the MACs ratio, {_f(ideal)}."
        for ly in layers:
            shape, new = ly.get("weight_shape"), ly.get("pruned_shape")
            if ly.get("prunable") and new and shape and list(new) != list(shape):
                details.append({"layer": ly["name"], "weight_shape": list(shape), "pruned_shape": list(new)})

    out.update({"summary": summary, "estimated_accelerator_speedup": round(est, 4), "cost_model": model,
                "cost_model_parameters": asdict(cm), "details": details})
    return out
