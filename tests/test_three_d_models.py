"""Tiny residual models shared by the 3D tests (imported by the other test_three_d_* files), and the
MACs-monotonicity tests of the three axes on them."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator

import onnx
import onnx2torch
import onnxslim
import pytest
import torch
from torch import Tensor, fx, nn

from pruning_core.accelerators import resolve_profile
from pruning_core.macs import count_macs
from pruning_core.methods.three_d.depth import find_residual_blocks, remove_blocks
from pruning_core.methods.three_d.resolution import candidate_sizes
from pruning_core.methods.three_d.width import prune_width


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convs run ~20x faster on one thread when the CI machine is oversubscribed (measured: 2.2 ms vs
    45 ms per 32x8x16x16 conv at load 10 on 2 cores); restored after each test so other modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Block(nn.Module):
    """relu(x + conv(relu(conv(x)))): a removable residual block with an identity skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.c2(torch.relu(self.c1(x))))


class Down(nn.Module):
    """A strided block with a projection skip: NOT removable (its output shape differs from its input)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(a, b, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(a, b, 1, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.proj(x) + self.c1(x))


class TinyResNet(nn.Module):
    """stem -> 2 blocks (c) -> Down -> 2 blocks (2c) -> global pool -> Linear: 4 removable blocks."""

    def __init__(self, c: int = 16, classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_ch, c, 3, padding=1)
        self.s1 = nn.Sequential(Block(c), Block(c))
        self.down = Down(c, 2 * c)
        self.s2 = nn.Sequential(Block(2 * c), Block(2 * c))
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.s2(self.down(self.s1(torch.relu(self.stem(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class FixedHead(nn.Module):
    """Flatten + Linear on the feature map: only accepts its training resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def traced(seed: int = 0, c: int = 16) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(TinyResNet(c).eval())


def converted(seed: int = 0, size: int = 16) -> fx.GraphModule:
    """TinyResNet through torch.onnx.export(dynamo=False) + onnxslim + onnx2torch, like an uploaded model."""
    torch.manual_seed(seed)
    m = TinyResNet().eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 1, size, size),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return onnx2torch.convert(onnxslim.slim(onnx.load_from_string(buf.getvalue())))


X = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_depth_macs_strictly_decrease_block_by_block() -> None:
    gm = traced()
    blocks = [b.name for b in find_residual_blocks(gm, X)]
    macs = [count_macs(remove_blocks(gm, blocks[:k]), X) for k in range(len(blocks) + 1)]
    assert all(a > b for a, b in itertools.pairwise(macs)), macs


def test_width_macs_strictly_decrease_with_kept_channels() -> None:
    gm = traced()
    prof = resolve_profile({"channel_multiple": 4})
    macs = [count_macs(prune_width(gm, X, k, prof).module, X) for k in (1.0, 0.75, 0.5, 0.25)]
    assert all(a > b for a, b in itertools.pairwise(macs)), macs


def test_resolution_macs_strictly_decrease_and_fixed_heads_are_refused() -> None:
    gm = traced()
    sizes = candidate_sizes(gm, X)
    # stride product 2 (one stride-2 Down) -> sizes are multiples of 2 from 16 down to 4 (min ratio 0.25)
    assert sizes == [(16, 16), (14, 14), (12, 12), (10, 10), (8, 8), (6, 6), (4, 4)]
    macs = [count_macs(gm, torch.zeros(1, 1, *s)) for s in sizes]
    assert all(a > b for a, b in itertools.pairwise(macs)), macs
    assert candidate_sizes(fx.symbolic_trace(FixedHead()), X) == [(16, 16)]
