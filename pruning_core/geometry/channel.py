"""Output-channel geometry through Torch-Pruning's dependency graph (Fang et al., DepGraph, CVPR 2023).

One unit per dependency group: every layer that must lose the same channel (the convs feeding a residual
add, a depthwise conv and its producer, the BatchNorm after a concat, ...) shares one mask entry per
channel of the group's root layer. While masks are soft, the mask multiplies the *out-channel* parameters
of the group (Conv/Linear weight rows and biases, norm-layer weight and bias), so a zero mask entry makes
the channel exactly zero everywhere it is produced; `finalize` then removes the channels physically
(consumers' input channels included) with `Group.prune()`. For BatchNorm groups the masked and the pruned
model compute the same function; LayerNorm / GroupNorm normalise across channels, so there removal differs
slightly from masking (noted in `plan.notes`). Grouped convs tie the channels at the same index of every
conv group into one pruning group (balanced removal); channel shuffles are barriers (groups through them kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from pruning_core.errors import HwpruneError
from pruning_core.geometry.masking import MaskFn, raw_tensor
from pruning_core.geometry.policy import CONV_TYPES
from pruning_core.geometry.units import PruningUnit


@dataclass
class ChannelMember:
    """One out-channel pruning target of a group: `module`'s channels `idxs` follow root channels `root_idxs`."""

    name: str
    module: nn.Module
    idxs: Tensor
    root_idxs: Tensor

    def params(self) -> list[str]:
        """Names of the tensors whose dim 0 is this member's output channel."""
        m = self.module
        if isinstance(m, (*CONV_TYPES, nn.Linear)):
            return [p for p in ("weight", "bias") if getattr(m, p, None) is not None]
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.dim() == 1:  # BatchNorm / GroupNorm / LayerNorm / PReLU affine
            return [p for p in ("weight", "bias") if isinstance(getattr(m, p, None), Tensor)]
        return []


def _tie_channels(channels: int, ties: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Union root channels that a grouped conv needs removed together (same index inside each conv group).

    Returns (component id per root channel, numbered by first channel; channels per component).
    """
    parent = list(range(channels))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for roots, keys in ties:
        first: dict[int, int] = {}
        for r, k in zip(roots.tolist(), keys.tolist(), strict=True):
            if k in first:
                ra, rb = find(first[k]), find(r)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            else:
                first[k] = r
    reps = [find(c) for c in range(channels)]
    ids: dict[int, int] = {}
    comp = torch.tensor([ids.setdefault(r, len(ids)) for r in reps], dtype=torch.long)
    return comp, torch.bincount(comp, minlength=len(ids)).float()


def is_grouped_not_depthwise(m: nn.Module) -> bool:
    """A grouped conv whose channels must be removed evenly per group (Torch-Pruning's graph alone does not)."""
    return isinstance(m, CONV_TYPES) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)


class ChannelUnit(PruningUnit):
    """The channels of one Torch-Pruning dependency group, indexed by the root layer's output channels."""

    def __init__(self, name: str, root: nn.Module, group: tp.dependency.Group, dg: tp.DependencyGraph,
                 names: dict[nn.Module, str], channel_multiple: int) -> None:
        self.name, self.root, self.dg = name, root, dg
        self.channels = int(raw_tensor(root, "weight").shape[0])  # the root's output channels
        self.nm_m = None
        self.mask = None
        self.members: list[ChannelMember] = []
        self.in_members: list[str] = []  # layers that only lose input channels
        self.grouped_convs: list[str] = []  # grouped (not depthwise) convs the group reaches
        ties: list[tuple[Tensor, Tensor]] = []  # (root channels, key within a conv group) for grouped convs
        for item in group:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            local = torch.as_tensor(list(idxs), dtype=torch.long)
            roots = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
            if is_grouped_not_depthwise(mod):
                if names[mod] not in self.grouped_convs:
                    self.grouped_convs.append(names[mod])
                width = int(getattr(mod, "out_channels" if is_out else "in_channels"))
                per_group = width // int(getattr(mod, "groups", 1))
                ties.append((roots, local % per_group))
            if is_out:
                self.members.append(ChannelMember(names[mod], mod, local, roots))
            elif isinstance(mod, (*CONV_TYPES, nn.Linear)):
                self.in_members.append(names[mod])
        self.comp_of_root, sizes = _tie_channels(self.channels, ties)
        self.num_groups = int(sizes.numel())
        self.comp_size = sizes
        width = int(sizes[0]) if self.num_groups else 1
        self.uneven = bool((sizes != width).any())
        # a grouped conv removes one channel per conv group at a time: kept channels = kept groups * width
        self.channel_multiple = math.lcm(width, channel_multiple) // width

    @property
    def normalised_by(self) -> list[str]:
        """Members that normalise across channels (LayerNorm, GroupNorm): masking != removal for them."""
        return [m.name for m in self.members if isinstance(m.module, (nn.LayerNorm, nn.GroupNorm))]

    @property
    def layer_names(self) -> list[str]:
        return [m.name for m in self.members if isinstance(m.module, (*CONV_TYPES, nn.Linear))]

    def kept_channels(self, mask: Tensor) -> int:
        """Root channels kept by a hard mask over this unit's groups."""
        return int((mask.detach().cpu() * self.comp_size).sum())

    def _accumulate(self, what: str) -> Tensor:
        acc = torch.zeros(self.channels, dtype=torch.float64)
        for mem in self.members:
            for p in mem.params():
                t = raw_tensor(mem.module, p).detach()
                rows = t.index_select(0, mem.idxs.to(t.device)).reshape(len(mem.idxs), -1)
                v = rows.double().pow(2).sum(1) if what == "sq" else torch.full((len(mem.idxs),), rows.shape[1],
                                                                                  dtype=torch.float64)
                acc.index_add_(0, mem.root_idxs, v.cpu())
        return torch.zeros(self.num_groups, dtype=torch.float64).index_add_(0, self.comp_of_root, acc)

    def group_norms(self) -> Tensor:
        return self._accumulate("sq").sqrt().float()

    def group_sizes(self) -> Tensor:
        return self._accumulate("n").float()

    def mask_fn(self, member: ChannelMember, param: str) -> MaskFn:
        """The mask source for one tensor of one member: ones except this group's channels."""
        t = raw_tensor(member.module, param)
        size, dims = t.shape[0], t.dim()
        comps = self.comp_of_root.index_select(0, member.root_idxs)

        def fn() -> Tensor | None:
            if self.mask is None:
                return None
            full = torch.ones(size, dtype=self.mask.dtype, device=self.mask.device)
            vals = self.mask.index_select(0, comps.to(self.mask.device))
            full = full.index_copy(0, member.idxs.to(self.mask.device), vals)
            return full.reshape(size, *([1] * (dims - 1)))

        return fn

    def prune(self, keep: Tensor) -> int:
        """Physically remove the channels whose hard mask is 0; returns how many were removed."""
        dropped_comp = keep.detach().cpu() < 0.5
        drop = torch.nonzero(dropped_comp[self.comp_of_root]).flatten().tolist()
        if not drop:
            return 0
        assert len(drop) < self.channels, f"{self.name}: refusing to remove every channel"
        pruner = self.dg.get_pruner_of_module(self.root)
        group = self.dg.get_pruning_group(self.root, pruner.prune_out_channels, drop)
        group.prune()
        return len(drop)


class _BarrierPruner:
    """Torch-Pruning handler for a layout op that splits or interleaves channels (channel shuffle).

    Its in- and out-channel functions differ, so a group stops at it instead of flowing through (the
    index mapping of a shuffle is not something Torch-Pruning models; on converted graphs its traversal
    does not even terminate); a group that reaches a barrier is then marked unprunable.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        return layer

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channels(self, layer: nn.Module) -> None:
        return None

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1


_BARRIER_CLASSES: dict[type, type] = {}


def _barrier_class(cls: type) -> type:
    if cls not in _BARRIER_CLASSES:
        _BARRIER_CLASSES[cls] = type(f"ChannelBarrier{cls.__name__}", (cls,), {})
    return _BARRIER_CLASSES[cls]


def _splits_channels(x: Tensor, y: Tensor) -> bool:
    """A reshape/transpose that moves the channel dim (N, C, ...) into another layout.

    Flatten-like (N, C*...) and unsqueeze/squeeze that keep (N, C) leading are fine: Torch-Pruning maps them.
    """
    if x.dim() < 2 or y.numel() != x.numel() or y.shape == x.shape:
        return False
    if y.dim() == 2 and y.shape[0] == x.shape[0]:
        return False
    return not (y.dim() >= 2 and tuple(y.shape[:2]) == tuple(x.shape[:2]))


def find_channel_barriers(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> dict[nn.Module, str]:
    """Leaf modules (converted-graph ops) that reshape or transpose channels away from dim 1."""
    names = {m: n for n, m in model.named_modules()}
    found: dict[nn.Module, str] = {}

    def hook(m: nn.Module, inputs: tuple[object, ...], out: object) -> None:
        x = next((i for i in inputs if isinstance(i, Tensor) and i.is_floating_point()), None)
        if x is None or not isinstance(out, Tensor):
            return
        # a pure transpose (NCHW -> NHWC before LayerNorm / Linear, as in ConvNeXt) only moves the channel
        # dim; Torch-Pruning follows it. Reshapes that split or merge channels (shuffle) are barriers.
        is_transpose = "Transpose" in type(m).__name__ or "Permute" in type(m).__name__
        if is_transpose and x.dim() == out.dim() and sorted(x.shape) == sorted(out.shape):
            return
        if _splits_channels(x, out):
            found[m] = names[m]

    leaves = [m for m in model.modules() if not list(m.children()) and not list(m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for h in hooks:
            h.remove()
    return found


def build_dependency_graph(model: nn.Module, example_input: Tensor | tuple[Tensor, ...],
                           barriers: dict[nn.Module, str]) -> tp.DependencyGraph:
    """Torch-Pruning's graph with `barriers` as group boundaries (their classes are swapped while tracing)."""
    original = {m: m.__class__ for m in barriers}
    pruner = _BarrierPruner()
    custom = {}
    for m, cls in original.items():
        m.__class__ = _barrier_class(cls)
        custom[m.__class__] = pruner
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False,
                                                         customized_pruners=custom)
    finally:
        for m, cls in original.items():
            m.__class__ = cls


def barrier_in_group(group: tp.dependency.Group, barriers: dict[nn.Module, str]) -> str | None:
    for item in group:
        mod = item.dep.target.module
        if isinstance(mod, nn.Module) and mod in barriers:
            return barriers[mod]
    return None


def channel_groups(dg: tp.DependencyGraph) -> list[tuple[nn.Module, tp.dependency.Group]]:
    """Every dependency group rooted at a Conv/Linear, as (root, group)."""
    return [(g[0].dep.target.module, g) for g in dg.get_all_groups(root_module_types=(*CONV_TYPES, nn.Linear))]


def touches_output(dg: tp.DependencyGraph, group: tp.dependency.Group) -> bool:
    """True when removing the group's channels would change a model output's shape."""
    for item in group:
        dep = item.dep
        if dg.is_out_channel_pruning_fn(dep.handler) and len(dep.target.outputs) == 0:
            return True
    return False


def _reshape_modules(model: nn.Module) -> list[nn.Module]:
    """Converted-graph Reshape ops (onnx2torch `OnnxReshape`, ingest's `ReshapeAllowZero`): forward(x, shape)."""
    return [m for m in model.modules() if "Reshape" in type(m).__name__ and not list(m.children())]


def reshape_target_after(target: list[int], before: tuple[int, ...], after: tuple[int, ...]) -> list[int]:
    """The reshape target that does to `after` what `target` did to `before` (channel count changed only)."""
    if -1 in target or math.prod(after) == math.prod(d if d else before[i] for i, d in enumerate(target)):
        return target
    if len(target) == 2 and target[0] in (before[0], 0):  # flatten (N, C, ...) -> (N, C*...)
        return [target[0], math.prod(after[1:])]
    if len(target) >= 2 and len(before) >= 2 and target[1] == before[1]:  # (N, C, ...) keeps C at dim 1
        return [target[0], after[1], *target[2:]]
    return target


class ReshapeTargets:
    """Constant Reshape targets of a converted graph, re-derived after channels are removed.

    ONNX graphs exported with a static batch (the dynamo exporter's default) flatten with constant targets
    like [1, 512]; once 512 channels become 256 that constant is stale. `record` notes each reshape's input
    shape and target on the dense model; `fix` runs the pruned model once and rewrites stale targets in place
    (the constant tensor the graph reads), so the model, and its ONNX re-export, follow the new widths.
    """

    def __init__(self, model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> None:
        self.model, self.example_input = model, example_input
        self.seen: dict[nn.Module, tuple[tuple[int, ...], list[int]]] = {}
        self.users: dict[int, set[nn.Module]] = {}

        def rec(m: nn.Module, args: tuple[object, ...]) -> None:
            if len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
                self.seen[m] = (tuple(args[0].shape), [int(v) for v in args[1].tolist()])
                self.users.setdefault(id(args[1]), set()).add(m)

        self._run(rec)

    def _run(self, hook: object) -> None:
        handles = [m.register_forward_pre_hook(hook) for m in _reshape_modules(self.model)]  # type: ignore[arg-type]
        try:
            with torch.no_grad():
                args = self.example_input if isinstance(self.example_input, tuple) else (self.example_input,)
                self.model(*args)
        finally:
            for h in handles:
                h.remove()

    def fix(self) -> list[str]:
        """Rewrite stale targets; returns a note per rewrite. Raises when a shared constant would need two values."""
        notes: list[str] = []
        names = {m: n for n, m in self.model.named_modules()}

        def fix_one(m: nn.Module, args: tuple[object, ...]) -> None:
            if m not in self.seen or len(args) < 2 or not isinstance(args[0], Tensor):
                return
            shape = args[1]
            assert isinstance(shape, Tensor)
            before, target = self.seen[m]
            new = reshape_target_after(target, before, tuple(args[0].shape))
            if new == [int(v) for v in shape.tolist()]:
                return
            if len(self.users.get(id(shape), set())) > 1:
                raise HwpruneError(f"reshape {names.get(m, '?')} shares its constant target with other reshapes; "
                                   "cannot rewrite it for the pruned widths (keep these layers with overrides)")
            shape.copy_(torch.tensor(new, dtype=shape.dtype))
            notes.append(f"{names.get(m, '?')}: reshape target {target} -> {new}")

        self._run(fix_one)
        return notes
