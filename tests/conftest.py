"""Shared fixtures: a small CNN really trained on scikit-learn's digits, exported to ONNX and TorchScript."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


@dataclass
class DigitsModel:
    onnx_path: Path
    torchscript_path: Path
    data_path: Path  # .npz with inputs [N, 1, 8, 8] and labels
    unlabelled_path: Path
    module: nn.Module


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny test models gain nothing from intra-op threads, and two threads on a busy 2-core box are ~17x slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y_np)
    torch.manual_seed(0)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # ~97% train accuracy: a real model to prune, in a few seconds
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    onnx_path = root / "digits.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    ts_path = root / "digits.pt"
    torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(ts_path))
    data_path = root / "digits.npz"
    np.savez(data_path, inputs=x.numpy(), labels=y_np.astype(np.int64))
    unlabelled = root / "digits_unlabelled.npz"
    np.savez(unlabelled, inputs=x.numpy()[:400])
    return DigitsModel(onnx_path, ts_path, data_path, unlabelled, model)
