"""The model zoo of issue 2, exported both ways (TorchScript exporter opset 17, dynamo exporter opset 18+),
must ingest, verify against ONNX Runtime, stay trainable, keep its interface, and round-trip:
converted torch graph -> ONNX again -> same outputs on ONNX Runtime at another batch size.

Exports are cached per test session (the `zoo` fixture); the large models carry the `slow` marker.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from pruning_core.ingest import inspect_model, load_model
from pruning_core.ingest.verify import compare
from pruning_core.macs import count_macs

slow = pytest.mark.slow
# (name, dynamo, marks). The TorchScript exporter is fast; the dynamo exporter takes 10-120 s per model
# on a shared 2-core machine, so only the small ones run in the default tier.
ZOO = [
    ("resnet18", False, ()), ("resnet18", True, ()),
    ("mobilenet_v2", False, ()), ("mobilenet_v2", True, (slow,)),
    ("shufflenet_v2_x1_0", False, ()), ("shufflenet_v2_x1_0", True, (slow,)),
    ("transformer_encoder", False, ()), ("transformer_encoder", True, ()),
    ("resnet50", False, (slow,)), ("resnet50", True, (slow,)),
    ("efficientnet_b0", False, (slow,)), ("efficientnet_b0", True, (slow,)),
    ("densenet121", False, (slow,)), ("densenet121", True, (slow,)),
    ("convnext_tiny", False, (slow,)), ("convnext_tiny", True, (slow,)),
    ("regnet_y_400mf", False, (slow,)), ("regnet_y_400mf", True, (slow,)),
    ("vit_b_16", False, (slow,)), ("vit_b_16", True, (slow,)),
]


def build(name: str) -> tuple[nn.Module, list[int]]:
    """Model (weights=None, seeded) and its example shape at batch 1 (small images where the model allows)."""
    torch.manual_seed(0)
    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        model: nn.Module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        for param in model.parameters():  # the layers are deep copies: make them differ
            nn.init.normal_(param, std=0.2)
        return model.eval(), [1, 10, 32]
    size = 224 if name == "vit_b_16" else 64
    return getattr(torchvision.models, name)(weights=None).eval(), [1, 3, size, size]


def export(model: nn.Module, shape: list[int], path: Path, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # Example batch 2: torch.export specialises a batch of 1 to a constant.
            x = torch.randn([2, *shape[1:]])
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: batch},), verbose=False)
        else:
            torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    """Exported ONNX files, each model and exporter exported once per session on first use."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple[str, bool], Path] = {}

    def get(name: str, dynamo: bool) -> Path:
        if (name, dynamo) not in cache:
            folder = root / f"{name}-{'dynamo' if dynamo else 'ts'}"
            folder.mkdir()
            model, shape = build(name)
            export(model, shape, folder / "model.onnx", dynamo)
            cache[(name, dynamo)] = folder / "model.onnx"
        return cache[(name, dynamo)]

    return get


def ort_run(model_path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: x})]


def weight_buffers(module: nn.Module) -> list[str]:
    """Float tensors that are still buffers (BatchNorm running statistics are statistics, not weights)."""
    return [n for n, b in module.named_buffers()
            if b.is_floating_point() and b.numel() > 1 and "running_" not in n]


@pytest.mark.parametrize(("name", "dynamo"), [pytest.param(n, d, marks=m, id=f"{n}-{'dynamo' if d else 'ts'}")
                                              for n, d, m in ZOO])
def test_zoo_ingests_and_round_trips(zoo: Callable[[str, bool], Path], name: str, dynamo: bool) -> None:
    path = zoo(name, dynamo)
    original, shape = build(name)

    info = inspect_model(path)
    assert info.format == "onnx" and info.opset is not None and info.opset >= (18 if dynamo else 17)
    loaded = load_model(path)  # raises if the converted graph disagrees with ONNX Runtime (verify.py)

    # interface kept
    assert loaded.input_names == ["x"] and loaded.output_names == ["y"]
    assert loaded.dynamic_batch and loaded.input_shape == shape
    # every weight trainable, none left behind as a buffer
    params = list(loaded.module.parameters())
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert weight_buffers(loaded.module) == []
    # the ONNX MAC count (shape inference, API side) agrees with FlopCounterMode on the converted graph
    # and on the original torch model. Transformers are counted in train mode (dropout is 0): in eval
    # under no_grad, torch takes a fused attention fast path that FlopCounterMode does not see.
    x1 = torch.randn(shape)
    reference = original.train() if name in ("vit_b_16", "transformer_encoder") else original
    assert info.macs == loaded.info.macs == count_macs(reference, x1) > 0
    if name in ("vit_b_16", "transformer_encoder"):
        # attention/MLP projections must be prunable nn.Linear layers, not matmuls against buffers
        linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
        per_block = 3  # out_proj, linear1/2 or mlp.0/3; in_proj is one more Linear or a MatMul+Add
        blocks = 12 if name == "vit_b_16" else 2
        assert len(linears) >= blocks * per_block

    # batch 2: the converted graph matches ONNX Runtime on the original model (dynamic batch works)
    x2 = torch.randn([2, *shape[1:]], generator=torch.Generator().manual_seed(5))
    want = ort_run(path, x2.numpy())
    with torch.no_grad():
        got = loaded.module(x2)
    assert compare([got.numpy()], want).ok

    # round trip: the converted graph exports back to ONNX with a dynamic batch and still matches
    out = path.parent / "roundtrip.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(loaded.module, (torch.randn(shape),), str(out), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    assert compare(ort_run(out, x2.numpy()), want).ok
