"""Shared benchmark fixtures: scikit-learn's digits with a fixed split, two small models, dense training.

Why digits: it ships with scikit-learn (no download), trains in seconds on 2 CPU cores, and is hard enough
that very high block sparsity (0.95-0.97) separates pruning methods (see the notes at the end of
`shared/papers/smart-pruner.md`). Accuracy saturates near 99%, so benchmarks also report fidelity to the
dense logits (`rel_l2`).

Stable API (bench/quality.py and bench/three_d.py import it; run the scripts as `python -m bench.<name>`):
    load_digits_split(size=8, seed=0) -> DigitsSplit        # images [N, 1, size, size], standardised
    small_cnn(in_size=8) -> nn.Module                       # Conv-BN-ReLU x3 + global pool + Linear
    small_transformer() -> nn.Module                        # rows of the 8x8 image as 8 tokens
    train_dense(model, split, steps, lr, batch_size, seed) -> nn.Module
    accuracy(model, x, y) -> float ; logits(model, x) -> Tensor ; rel_l2(student, dense) -> float
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

NUM_CLASSES = 10


@dataclass
class DigitsSplit:
    """Fixed stratified train/test split; images standardised with the TRAIN mean/std (no test leakage)."""

    x_train: Tensor  # [n_train, 1, size, size] float32
    y_train: Tensor  # [n_train] int64
    x_test: Tensor  # [n_test, 1, size, size] float32
    y_test: Tensor  # [n_test] int64
    size: int  # image side: 8 (native) or upsampled, e.g. 32

    @property
    def example_input(self) -> Tensor:
        """One training image as a batch of 1: the example input for tracing / ONNX export."""
        return self.x_train[:1].clone()


def load_digits_split(size: int = 8, test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """1797 8x8 digit images; `size` > 8 upsamples bilinearly (e.g. 32 for ResNet-style models).

    The split depends only on `seed` (default 0), so every method and every benchmark seed sees the same
    test images; benchmark seeds vary training, not the data.
    """
    assert size >= 8, f"size must be >= 8 (native digits are 8x8), got {size}"
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # pixel values are 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    xt = torch.from_numpy(x_tr).unsqueeze(1)
    xe = torch.from_numpy(x_te).unsqueeze(1)
    if size != 8:
        xt = F.interpolate(xt, size=(size, size), mode="bilinear", align_corners=False)
        xe = F.interpolate(xe, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = xt.mean(), xt.std()
    return DigitsSplit(
        x_train=((xt - mean) / std).contiguous(), y_train=torch.from_numpy(y_tr),
        x_test=((xe - mean) / std).contiguous(), y_test=torch.from_numpy(y_te), size=size,
    )


def small_cnn(in_size: int = 8, widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Module:
    """Three Conv-BN-ReLU blocks (one 2x downsample), global average pool, Linear classifier.

    BatchNorm is deliberate: it makes filter norms scale-invariant, the case where global magnitude ranking
    of channels fails (paper notes), so the benchmark exercises it. ~24k parameters.
    """
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.MaxPool2d(2) if in_size <= 16 else nn.MaxPool2d(4),
        nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, NUM_CLASSES),
    )


class RowTransformer(nn.Module):
    """Image rows as tokens: Linear embedding + learned positions -> nn.TransformerEncoder -> mean pool -> Linear.

    Small enough for CPU benchmarks, but made of the layers N:M (2:4) pruning targets on Transformers.
    """

    def __init__(self, size: int = 8, d_model: int = 32, nhead: int = 4, layers: int = 2, ff: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(size, d_model)
        self.pos = nn.Parameter(torch.zeros(1, size, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x.flatten(1, 2)) + self.pos  # [B, 1, H, W] -> [B, H, W] -> [B, H, d]
        return self.head(self.encoder(tokens).mean(dim=1))


def small_transformer(size: int = 8) -> nn.Module:
    return RowTransformer(size=size)


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> list[Tensor]:
    """Index batches by reshuffling each epoch (deterministic given the generator)."""
    out: list[Tensor] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos : pos + batch_size])
        pos += batch_size
    return out


def train_dense(
    model: nn.Module, split: DigitsSplit, steps: int = 600, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
) -> nn.Module:
    """Plain supervised training (Adam, cross-entropy, cosine lr); returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    for idx in _batches(len(split.y_train), batch_size, steps, gen):
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((logits(model, x).argmax(1) == y).float().mean())


def rel_l2(student: Tensor, dense: Tensor) -> float:
    """||student - dense|| / ||dense|| over the whole logit matrix: fidelity that does not saturate like accuracy."""
    return float((student - dense).norm() / dense.norm().clamp_min(1e-12))
