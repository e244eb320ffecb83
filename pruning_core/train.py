"""Fine-tuning after (or while) pruning: task loss plus distillation from the dense model.

With labels: cross-entropy + distillation against the dense teacher; without labels (uploaded or synthetic
inputs): distillation only. Distillation regresses every output on the teacher's (MSE relative to the teacher's
mean square); for logits that is logit matching (Ba & Caruana, 2014; Kim et al., IJCAI 2021), which anchors
their scale. Hinton's softened KL (`kd_loss="kl"`) does not: against a confident teacher its targets are
nearly one-hot, so, like cross-entropy, it keeps growing the margins (docs/benchmarks/quality.md).
Pruners plug in through hooks: `before_step(step)` (e.g. SMART recomputes its soft masks) and `after_step(step)`
(e.g. gradual magnitude pruning updates its masks), and extra optimizer parameter groups (e.g. SMART's scores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from pruning_core.data import TrainData
from pruning_core.progress import StageProgress


@dataclass
class TrainConfig:
    lr: float = 1e-3  # Adam learning rate for the weights; cosine-decayed to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    batch_size: int = 32
    seed: int = 0
    kd_loss: str = "mse"  # logits: "mse" (matching, relative to the teacher's mean square) or "kl" (Hinton et al.).
    #   On digits at 500 steps "kl" let pruned logits grow 1.1-1.7x the teacher's scale; their relative L2 error
    #   was 1.1-1.7x "mse"'s averaged over the grid (up to 3.7x in a cell), at the same accuracy
    #   (docs/benchmarks/quality.md)
    kd_temperature: float = 2.0  # "kl" only: softens logits (Hinton et al. use 2-4)
    kd_weight: float = 0.5  # with labels: loss = (1 - w) * CE + w * KD; without labels: KD only
    weight_decay: float = 0.0  # pruned weights must stay zero under masks; decay would only shrink the kept ones
    log_every: int = 10  # progress callbacks (the caller rate-limits persistence)
    bn_recalibration_samples: int = 1024  # after the last step, BatchNorm statistics are re-estimated on up to this
    #   many training inputs under the final weights (0: keep the running averages). The running averages trail
    #   weights that kept changing; on digits at 0.97 block sparsity one SMART run went 24% -> 50% from this alone

    def __post_init__(self) -> None:
        assert self.kd_loss in ("mse", "kl"), f"kd_loss must be 'mse' or 'kl', got {self.kd_loss!r}"


def as_outputs(out: Any) -> list[torch.Tensor]:
    """Converted graphs return a tensor, a tuple or a list; treat them all as a list of outputs."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, torch.Tensor)]
    if isinstance(out, dict):
        return [o for o in out.values() if isinstance(o, torch.Tensor)]
    raise TypeError(f"model returned {type(out).__name__}, expected tensors")


def is_logits(t: torch.Tensor) -> bool:
    return t.ndim == 2 and t.shape[1] > 1


def distill_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], labels: torch.Tensor | None,
                 cfg: TrainConfig) -> torch.Tensor:
    """Scale-normalised MSE per output (KL on softened logits with kd_loss="kl"); plus CE when labelled."""
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if is_logits(s) and cfg.kd_loss == "kl":
            temp = cfg.kd_temperature
            kd = F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), log_target=True,
                          reduction="batchmean") * temp * temp
        else:
            kd = F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)
        losses.append(kd)
    loss = torch.stack(losses).mean()
    if labels is not None and is_logits(student[0]) and int(labels.max()) < student[0].shape[1]:
        ce = F.cross_entropy(student[0], labels)
        loss = (1 - cfg.kd_weight) * ce + cfg.kd_weight * loss
    return loss


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Outputs of `model` on all `inputs` (eval mode, batched), concatenated per output."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    chunks: list[list[torch.Tensor]] = []
    for i in range(0, inputs.shape[0], batch_size):
        chunks.append([o.detach().float().cpu() for o in as_outputs(model(inputs[i : i + batch_size].to(device)))])
    model.train(was_training)
    return [torch.cat([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_steps(
    model: nn.Module,
    teacher: nn.Module | None,
    data: TrainData,
    steps: int,
    cfg: TrainConfig,
    *,
    progress: StageProgress | None = None,
    extra_param_groups: Sequence[dict[str, Any]] = (),
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    weight_params: Sequence[nn.Parameter] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    teacher_outputs: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Run `steps` optimisation steps; returns the loss history (one entry per `log_every` steps).

    `optimizer` (from `make_optimizer`) continues an earlier run's Adam moments, e.g. across SMART's phases; its
    own groups are used then, not `extra_param_groups` / `weight_params`. Group 0 (the weights) follows the
    cosine schedule from the lr it was created with.

    Teacher outputs are computed once for the whole dataset (the teacher is frozen and the data are not
    augmented), which removes a dense forward pass from every step; a caller that trains several times on the
    same teacher and data passes them in (`teacher_outputs`, from `predict`) instead of recomputing them.
    Ends with `recalibrate_batchnorm`.
    """
    torch.manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    if steps <= 0:
        return history
    device = _device_of(model)
    targets = teacher_outputs
    if targets is None and teacher is not None:
        targets = predict(teacher, data.inputs)
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg, extra_param_groups, weight_params)
    base_lrs = [g.setdefault("base_lr", g["lr"]) for g in opt.param_groups]
    index = torch.arange(len(data))
    batches = _index_batches(index, cfg.batch_size, cfg.seed)
    model.train()
    for step in range(steps):
        if progress is not None:
            progress.check_cancel()
        scale = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * scale if g is opt.param_groups[0] else base
        idx = next(batches)
        x = data.inputs[idx].to(device)
        y = data.labels[idx].to(device) if data.labels is not None else None
        if before_step is not None:
            before_step(step)
        out = as_outputs(model(x))
        if targets is not None:
            loss = distill_loss(out, [t[idx].to(device) for t in targets], y, cfg)
        else:
            assert y is not None, "training without a teacher needs labels"
            loss = F.cross_entropy(out[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)
        if step % cfg.log_every == 0 or step == steps - 1:
            entry = {"step": float(step), "loss": float(loss.detach())}
            history.append(entry)
            if progress is not None:
                progress((step + 1) / steps, entry)
    recalibrate_batchnorm(model, data.inputs, cfg)
    model.eval()
    return history


def make_optimizer(model: nn.Module, cfg: TrainConfig, extra_param_groups: Sequence[dict[str, Any]] = (),
                   weight_params: Sequence[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """Adam over the weights (group 0, the scheduled one) and any extra groups (e.g. SMART's scores)."""
    params = list(weight_params) if weight_params is not None else [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups += [dict(g) for g in extra_param_groups]
    return torch.optim.Adam(groups)


def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, cfg: TrainConfig) -> None:
    """Re-estimate BatchNorm running statistics under the current weights ("adaptive BN", Li et al., EagleEye,
    ECCV 2020: pruned networks are evaluated with stale statistics otherwise), by torch's `update_bn`: a plain
    average over the batches of `cfg.bn_recalibration_samples` training inputs (seeded order) instead of an EMA
    over the last few batches of a moving model. Models without BatchNorm are left untouched."""
    if cfg.bn_recalibration_samples <= 0 or not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return  # ingested ONNX models mostly have BatchNorm folded into their convolutions
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(cfg.seed))
    order = order[: cfg.bn_recalibration_samples]
    # a generator: one batch in memory at a time (1024 ImageNet-sized inputs would be ~600 MB at once)
    batches = (inputs[order[i : i + cfg.batch_size]] for i in range(0, len(order), cfg.batch_size))
    update_bn(batches, model, _device_of(model))


def _index_batches(index: torch.Tensor, batch_size: int, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    n = index.shape[0]
    bs = min(batch_size, n)
    while True:
        perm = index[torch.randperm(n, generator=gen)]
        for i in range(0, n - bs + 1, bs):
            yield perm[i : i + bs]


@torch.no_grad()
def accuracy(model: nn.Module, data: TrainData) -> float | None:
    """Top-1 accuracy of the first output against the labels, or None without labels."""
    if data.labels is None:
        return None
    logits = predict(model, data.inputs)[0]
    if not is_logits(logits):
        return None
    return float((logits.argmax(1) == data.labels).float().mean())
