"""The pruning plan: which groups exist in a model under one geometry, how masks apply, how they are baked.

`build_plan` decides the units (one per prunable layer for block / N:M, one per dependency group for
channel) and a `LayerRecord` for every weight layer. `attach` registers masks as parametrizations so
training sees `w * expand(mask)`; `set_masks` swaps in soft or hard masks (gradients flow to them);
`select` turns scores into hard masks that honour the geometry and budget; `finalize` bakes zeros
(block / N:M) or removes channels physically (channel) and fills the records.
Shaped after torch.ao.pruning (prepare / step / squash_mask) and Torch-Pruning (geometry apart from importance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pruning_core.accelerators import AcceleratorProfile
from pruning_core.errors import HwpruneError, InvalidRequest
from pruning_core.geometry.block import BlockUnit
from pruning_core.geometry.channel import (
    ChannelUnit,
    ReshapeTargets,
    barrier_in_group,
    build_dependency_graph,
    channel_groups,
    find_channel_barriers,
    touches_output,
)
from pruning_core.geometry.masking import MaskFn, add_mask, raw_tensor, remove_masks
from pruning_core.geometry.nm import NMUnit
from pruning_core.geometry.policy import (
    WEIGHT_TYPES,
    check_overrides,
    layer_policy,
    op_type,
    output_layers,
    weight_layers,
)
from pruning_core.geometry.records import LayerRecord
from pruning_core.geometry.select import select_masks
from pruning_core.geometry.units import PruningUnit

GRANULARITIES = ("block", "nm", "channel")


def _as_args(example_input: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _output_shapes(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> list[tuple[int, ...]]:
    from pruning_core.geometry.policy import _flatten

    with torch.no_grad():
        return [tuple(t.shape) for t in _flatten(model(*_as_args(example_input)))]


class PruningPlan:
    """Units, per-layer records and the mask machinery for one model under one geometry."""

    def __init__(self, model: nn.Module, example_input: Tensor | tuple[Tensor, ...], granularity: str,
                 profile: AcceleratorProfile, units: list[PruningUnit], layers: list[LayerRecord],
                 modules: dict[str, nn.Module]) -> None:
        self.model, self.example_input = model, example_input
        self.granularity, self.profile = granularity, profile
        self.units, self.layers = units, layers
        self._modules = modules  # weight layer name -> module (before finalize)
        self._dense_numel = {n: raw_tensor(m, "weight").numel() for n, m in modules.items()}
        self._dense_out = {n: int(raw_tensor(m, "weight").shape[0]) for n, m in modules.items()}
        self._output_shapes = _output_shapes(model, example_input)
        self.attached = False
        self.finalized = False
        self.notes: list[str] = []  # what finalize had to adapt (e.g. constant reshape targets)

    # -- masks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register all-ones masks as parametrizations (idempotent)."""
        if self.attached:
            return
        sources: dict[tuple[int, str], tuple[nn.Module, list[MaskFn]]] = {}

        def add(module: nn.Module, param: str, fn: MaskFn) -> None:
            sources.setdefault((id(module), param), (module, []))[1].append(fn)

        for u in self.units:
            u.mask = None
            if isinstance(u, (BlockUnit, NMUnit)):
                add(u.module, "weight", self._dense_fn(u))
            elif isinstance(u, ChannelUnit):
                for mem in u.members:
                    for p in mem.params():
                        add(mem.module, p, u.mask_fn(mem, p))
        for (_, param), (module, fns) in sources.items():
            add_mask(module, param, fns)
        self.attached = True

    @staticmethod
    def _dense_fn(u: BlockUnit | NMUnit) -> MaskFn:
        def fn() -> Tensor | None:
            return None if u.mask is None else u.expand(u.mask)
        return fn

    def set_masks(self, masks: Sequence[Tensor | None]) -> None:
        """One mask per unit, shape [num_groups], soft in [0, 1] or hard {0, 1}; None means all ones."""
        if len(masks) != len(self.units):
            raise InvalidRequest(f"need one mask per unit: got {len(masks)} for {len(self.units)} units")
        for u, m in zip(self.units, masks, strict=True):
            assert m is None or m.numel() == u.num_groups, f"{u.name}: mask {m.numel()} != {u.num_groups}"
            u.mask = None if m is None else m.reshape(-1)

    def masks(self) -> list[Tensor | None]:
        return [u.mask for u in self.units]

    # -- scores and selection --------------------------------------------------------------------------
    def group_norms(self) -> list[Tensor]:
        return [u.group_norms() for u in self.units]

    def select(self, scores: Sequence[Tensor], sparsity: float, allocation: str = "uniform",
               min_keep: float = 0.05) -> list[Tensor]:
        """Hard masks honouring the geometry and budget (see `geometry.select`)."""
        return select_masks(self.units, scores, sparsity, allocation, min_keep)

    def group_sparsity(self, hard_masks: Sequence[Tensor]) -> float:
        """Fraction of prunable groups removed (the budget's unit)."""
        total = sum(u.num_groups for u in self.units)
        kept = sum(float(m.sum()) for m in hard_masks)
        return 1.0 - kept / total if total else 0.0

    # -- finalize ----------------------------------------------------------------------------------
    def finalize(self, hard_masks: Sequence[Tensor]) -> nn.Module:
        """Bake the hard masks into the model (block / N:M zeros, channel removal) and fill the records."""
        assert not self.finalized, "plan already finalized"
        if len(hard_masks) != len(self.units):
            raise InvalidRequest(f"need one hard mask per unit: got {len(hard_masks)} for {len(self.units)}")
        for u, m in zip(self.units, hard_masks, strict=True):
            bad = ((m != 0) & (m != 1)).any()
            assert not bool(bad), f"{u.name}: finalize needs hard {{0,1}} masks"
        hard = [m.detach().float() for m in hard_masks]
        kept_per_layer: dict[str, tuple[int, int]] = {}
        if self.granularity == "channel":
            for mod in self._modules.values():
                remove_masks(mod, bake=False)
            for mod in {id(m.module): m.module for u in self.units if isinstance(u, ChannelUnit)
                        for m in u.members}.values():
                remove_masks(mod, bake=False)
            self.attached = False
            targets = ReshapeTargets(self.model, self.example_input)
            for u, m in zip(self.units, hard, strict=True):
                assert isinstance(u, ChannelUnit)
                u.mask = None
                u.prune(m)
                for lname in u.layer_names:
                    kept_per_layer[lname] = (self._dense_out[lname], u.kept_channels(m))
            try:
                self.notes += targets.fix()
            except RuntimeError as e:  # a reshape that cannot follow; _check_outputs words the error
                self.notes.append(f"reshape targets not rewritten: {e}")
        else:
            was_attached = self.attached
            if not was_attached:
                self.attach()
            self.set_masks(hard)
            for mod in self._modules.values():
                remove_masks(mod, bake=True)
            self.attached = False
            for u, m in zip(self.units, hard, strict=True):
                kept_per_layer[u.name] = (u.num_groups, int(m.sum()))
                u.mask = None
        self.finalized = True
        self._fill_records(kept_per_layer)
        self._check_outputs()
        return self.model

    def _fill_records(self, kept: dict[str, tuple[int, int]]) -> None:
        for rec in self.layers:
            w = raw_tensor(self._modules[rec.name], "weight").detach()
            rec.pruned_shape = tuple(w.shape)
            rec.groups, rec.kept = kept.get(rec.name, (0, 0))
            dense = self._dense_numel[rec.name]
            zeros = int((w == 0).sum()) + (dense - w.numel())
            rec.sparsity = zeros / dense

    def _check_outputs(self) -> None:
        try:
            shapes = _output_shapes(self.model, self.example_input)
        except Exception as e:  # a graph op that cannot follow the removal (constant reshape targets...)
            raise HwpruneError(f"the {self.granularity}-pruned model no longer runs ({type(e).__name__}: {e}); "
                               "keep the offending layers with overrides or use block/nm granularity") from e
        if shapes != self._output_shapes:
            raise HwpruneError(f"pruning changed the model's output shapes {self._output_shapes} -> {shapes}")

    # -- reporting ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "profile": self.profile.name, "units": len(self.units),
                "groups": sum(u.num_groups for u in self.units),
                "prunable_layers": sum(r.prunable for r in self.layers), "layers": len(self.layers)}


def build_plan(model: nn.Module, example_input: Tensor | tuple[Tensor, ...], granularity: str,
               profile: AcceleratorProfile, overrides: Mapping[str, str] | None = None) -> PruningPlan:
    """Decide the pruning units and per-layer records of `model` under `granularity` on `profile`."""
    overrides = dict(overrides or {})
    if granularity not in GRANULARITIES:
        raise InvalidRequest(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    all_layers = weight_layers(model)
    check_overrides(all_layers, overrides)
    outputs = output_layers(model, example_input)
    units: list[PruningUnit] = []
    records: list[LayerRecord] = []
    if granularity in ("block", "nm"):
        if granularity == "block" and profile.block_shape is None:
            raise InvalidRequest(f"granularity 'block' needs a profile with block_shape; {profile.name!r} has none")
        if granularity == "nm" and profile.nm is None:
            raise InvalidRequest(f"granularity 'nm' needs a profile with nm; {profile.name!r} has none")
        for name, m in all_layers.items():
            prunable, reason = layer_policy(name, m, granularity, outputs, overrides,
                                            profile.nm[1] if profile.nm else None)
            if prunable:
                if granularity == "block":
                    assert profile.block_shape is not None
                    units.append(BlockUnit(name, m, profile.block_shape))
                else:
                    assert profile.nm is not None
                    units.append(NMUnit(name, m, profile.nm))
            records.append(LayerRecord(name, op_type(m), tuple(raw_tensor(m, "weight").shape), prunable, reason))
    else:
        units, records = _channel_units(model, example_input, profile, all_layers, outputs, overrides)
    plan = PruningPlan(model, example_input, granularity, profile, units, records, all_layers)
    normed = [u.name for u in units if isinstance(u, ChannelUnit) and u.normalised_by]
    if normed:
        plan.notes.append(f"{len(normed)} channel group(s) pass through LayerNorm/GroupNorm ({normed[0]}, ...): "
                          "while masked, zeroed channels still count in the norm's statistics, so removing them "
                          "at finalize changes the output slightly (BatchNorm groups match exactly)")
    return plan


def require_prunable(plan: PruningPlan) -> None:
    """For a pruning job: a plan that cannot remove anything would "succeed" with the dense model, so refuse
    it and say why. (Callers such as 3D's width axis may legitimately build empty plans, so `build_plan`
    itself does not refuse.)"""
    granularity, profile, units, records = plan.granularity, plan.profile, plan.units, plan.layers
    if not units:
        reasons = sorted({r.reason for r in records}) or ["the model has no Conv/Linear weight layers"]
        raise InvalidRequest(f"no layer can be pruned at granularity {granularity!r} on profile {profile.name!r}: "
                             + "; ".join(reasons[:4]))
    if granularity == "block" and all(u.num_groups == 1 for u in units):
        r, c = profile.block_shape or (0, 0)
        largest = max((rec.weight_shape for rec in records if rec.prunable), key=lambda s: s[0], default=())
        raise InvalidRequest(f"block {r}x{c} is as large as every prunable weight (largest {list(largest)}, viewed "
                             "as out x in*kh*kw): each layer would be one all-or-nothing tile; use a smaller block")


def _channel_units(model: nn.Module, example_input: Tensor | tuple[Tensor, ...], profile: AcceleratorProfile,
                   all_layers: dict[str, nn.Module], outputs: set[str], overrides: Mapping[str, str],
                   ) -> tuple[list[PruningUnit], list[LayerRecord]]:
    names = {m: n for n, m in model.named_modules()}
    barriers = find_channel_barriers(model, example_input)
    try:
        dg = build_dependency_graph(model, example_input, barriers)
    except Exception as e:  # Torch-Pruning's tracer meets an op it cannot follow
        raise HwpruneError(f"channel pruning cannot trace this model's dependency graph ({type(e).__name__}: {e}); "
                           "use granularity 'block' or 'nm', which need no graph tracing") from e
    mult = profile.channel_multiple
    units: list[PruningUnit] = []
    decided: dict[str, tuple[bool, str]] = {}
    order = {n: i for i, n in enumerate(all_layers)}
    for root, group in channel_groups(dg):
        unit = ChannelUnit(names[root], root, group, dg, names, mult)
        layers = sorted(unit.layer_names, key=lambda n: order.get(n, len(order)))
        if layers:  # name the unit after its first layer in model order (stable, readable)
            unit.name = layers[0]
        coupled = f"{len(layers)} coupled layer{'s' if len(layers) != 1 else ''}"
        reason = ""
        kept_layers = [n for n in layers if overrides.get(n) == "keep"]
        barrier = barrier_in_group(group, barriers)
        if touches_output(dg, group) or any(n in outputs for n in layers):
            reason = "produces a model output: keeps its output channels (classifier keeps its classes)"
        elif barrier is not None:
            reason = (f"channels pass through {barrier}, a reshape/transpose that interleaves channels "
                      "(channel shuffle); its constant shape cannot follow channel removal, so kept")
        elif unit.uneven:
            reason = (f"grouped convs ({', '.join(unit.grouped_convs[:2])}) tie this group's channels unevenly; "
                      "kept")
        elif kept_layers:
            reason = f"override: keep ({', '.join(kept_layers)} in this channel group)"
        elif unit.num_groups <= unit.channel_multiple and unit.grouped_convs:
            step = unit.channels // max(unit.num_groups, 1)
            reason = (f"grouped conv {unit.grouped_convs[0]} removes channels {step} at a time (one per conv "
                      f"group); no smaller kept count is a multiple of {mult}, so kept")
        elif unit.num_groups <= unit.channel_multiple:
            reason = f"only {unit.channels} channels, not more than the channel multiple {mult}"
        elif not all(isinstance(all_layers.get(n), WEIGHT_TYPES) for n in layers):
            reason = "channel group contains a layer type we cannot prune"
        if reason:
            for n in layers:
                decided.setdefault(n, (False, reason if n == unit.name else f"coupled to {unit.name}: {reason}"))
            continue
        units.append(unit)
        for n in layers:
            why = f"output channels pruned in channel group of {unit.name} ({coupled})"
            decided[n] = (True, why)
    units.sort(key=lambda u: order.get(u.name, len(order)))
    records = []
    for name, m in all_layers.items():
        prunable, reason = decided.get(name, (False, "not reached by the dependency graph (kept)"))
        if not isinstance(m, WEIGHT_TYPES):
            prunable, reason = False, f"{op_type(m)}: not supported for pruning"
        records.append(LayerRecord(name, op_type(m), tuple(raw_tensor(m, "weight").shape), prunable, reason))
    return units, records
