"""Calibration / fine-tuning data: `.npz` uploads, or synthetic inputs when the user gave none.

An `.npz` holds `inputs` (float array, first axis = samples) and optionally `labels` (integer class per sample).
It is always read with `allow_pickle=False`: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pruning_core.errors import DatasetRejected

MAX_SAMPLES = 1_000_000
SYNTHETIC_SAMPLES = 512  # enough batches for distillation without repeating too often; cheap to hold in memory


@dataclass
class DatasetInfo:
    samples: int
    has_labels: bool
    input_shape: list[int]  # one sample's shape (no batch axis)
    num_classes: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "has_labels": self.has_labels, "input_shape": self.input_shape,
                "num_classes": self.num_classes}


@dataclass
class TrainData:
    """Inputs (and labels if any), plus a plain-words account of where they came from for the report."""

    inputs: torch.Tensor  # [N, ...] float32
    labels: torch.Tensor | None  # [N] int64
    source: str  # "labelled" | "unlabelled" | "synthetic"
    description: str

    def __post_init__(self) -> None:
        assert self.inputs.ndim >= 1 and self.inputs.shape[0] > 0, "dataset must hold at least one sample"
        assert self.labels is None or self.labels.shape[0] == self.inputs.shape[0], "one label per sample"

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: torch.Tensor, note: str = "") -> TrainData:
        labels = self.labels[index] if self.labels is not None else None
        return TrainData(self.inputs[index], labels, self.source, self.description + note)

    def split(self, holdout_fraction: float, seed: int) -> tuple[TrainData, TrainData]:
        """A seeded train / held-out split; held-out gets at least one sample, train keeps at least one."""
        n = len(self)
        if n < 2:
            return self, self
        k = min(max(1, round(n * holdout_fraction)), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[k:]), self.subset(perm[:k], " (held-out part)")

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Endless seeded epochs of shuffled batches (a short last batch is dropped when there is more than one)."""
        gen = torch.Generator().manual_seed(seed)
        n = len(self)
        bs = min(batch_size, n)
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - bs + 1, bs):
                idx = perm[i : i + bs]
                yield self.inputs[idx], (self.labels[idx] if self.labels is not None else None)


def _open_npz(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise DatasetRejected("dataset must be an .npz file (numpy.savez) with an 'inputs' array")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DatasetRejected(f"cannot read the .npz file: {e}") from e


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with _open_npz(path) as npz:
        if "inputs" not in npz.files:
            raise DatasetRejected(f"the .npz must contain an 'inputs' array; found {sorted(npz.files)}")
        try:
            inputs = npz["inputs"]
            labels = npz["labels"] if "labels" in npz.files else None
        except ValueError as e:  # object arrays need pickle, which we never allow
            raise DatasetRejected(f"arrays must be numeric (object arrays are not accepted): {e}") from e
    if inputs.dtype.kind not in "fiu" or inputs.ndim < 1:
        raise DatasetRejected(f"'inputs' must be a numeric array, got dtype {inputs.dtype} with {inputs.ndim} dims")
    if not 0 < inputs.shape[0] <= MAX_SAMPLES:
        raise DatasetRejected(f"'inputs' must hold 1..{MAX_SAMPLES} samples, got {inputs.shape[0]}")
    if not np.isfinite(inputs).all():
        raise DatasetRejected("'inputs' contains NaN or infinite values")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise DatasetRejected(
                f"'labels' must be a 1-D integer array, got dtype {labels.dtype}, shape {labels.shape}"
            )
        if labels.shape[0] != inputs.shape[0]:
            raise DatasetRejected(f"'labels' has {labels.shape[0]} entries but 'inputs' has {inputs.shape[0]} samples")
        if labels.size and labels.min() < 0:
            raise DatasetRejected("'labels' must be non-negative class indices")
    return inputs, labels


def inspect_dataset(path: Path) -> DatasetInfo:
    """Cheap validation for the API: shapes and label presence, no tensors kept."""
    inputs, labels = _read_arrays(path)
    return DatasetInfo(
        samples=int(inputs.shape[0]), has_labels=labels is not None, input_shape=list(inputs.shape[1:]),
        num_classes=int(labels.max()) + 1 if labels is not None and labels.size else None,
    )


def load_dataset(path: Path, model_input_shape: list[int] | None = None) -> TrainData:
    """Load an `.npz` and check one sample matches the model's input (batch axis excluded)."""
    inputs, labels = _read_arrays(path)
    if model_input_shape is not None and list(inputs.shape[1:]) != list(model_input_shape[1:]):
        raise DatasetRejected(
            f"dataset samples have shape {list(inputs.shape[1:])} but the model takes {list(model_input_shape[1:])} "
            f"per sample (input shape {model_input_shape}); resize the data or pass the matching input shape"
        )
    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    source = "labelled" if y is not None else "unlabelled"
    what = "cross-entropy on labels plus distillation from the dense model" if y is not None else (
        "distillation from the dense model (no labels given)")
    return TrainData(x, y, source, f"{len(x)} uploaded samples; fine-tuning used {what}")


def synthetic_data(input_shape: list[int], seed: int, samples: int = SYNTHETIC_SAMPLES) -> TrainData:
    """Standard-normal inputs (what normalised image/feature inputs look like) for data-free distillation."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *input_shape[1:]), generator=gen)
    return TrainData(
        x, None, "synthetic",
        f"NO DATA GIVEN: fine-tuning distilled the dense model on {samples} synthetic standard-normal inputs; "
        "fidelity is measured on synthetic inputs too, so it says little about accuracy on real data",
    )
