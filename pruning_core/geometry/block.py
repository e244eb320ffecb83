"""Block (R x C tile) geometry for NPU-style block-sparse engines.

The weight is viewed as a matrix `(out, in*kh*kw)` = `w.reshape(out, -1)` (PyTorch memory order, so a
column index is `ci*kh*kw + y*kw + x`) and cut into tiles of R rows x C columns, numbered row-major
(`g = tile_row * n_tile_cols + tile_col`). When `out % R` or `cols % C` is not zero, the tiles on the bottom
and right edges are smaller (ragged); they are still all-or-nothing groups, and `group_sizes` reports
their true size so scores can be normalised fairly. An engine that pads to full tiles skips them as well.
Reference: SMART pruner (Ding et al. 2024, arXiv 2403.19969), block pruning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pruning_core.geometry.masking import raw_tensor
from pruning_core.geometry.units import PruningUnit


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class BlockUnit(PruningUnit):
    """The R x C tiles of one layer's weight."""

    def __init__(self, name: str, module: nn.Module, block: tuple[int, int]) -> None:
        self.name, self.module = name, module
        self.rows, self.cols = block
        w = raw_tensor(module, "weight")
        self.weight_shape = tuple(w.shape)
        self.out, self.width = w.shape[0], w[0].numel()
        self.n_r, self.n_c = _ceil_div(self.out, self.rows), _ceil_div(self.width, self.cols)
        self.num_groups = self.n_r * self.n_c
        self.nm_m = None
        self.mask = None

    def _padded(self, w2: Tensor) -> Tensor:
        pr, pc = self.n_r * self.rows - self.out, self.n_c * self.cols - self.width
        return nn.functional.pad(w2, (0, pc, 0, pr))

    def group_norms(self) -> Tensor:
        w = raw_tensor(self.module, "weight").detach()
        t = self._padded(w.reshape(self.out, -1)).reshape(self.n_r, self.rows, self.n_c, self.cols)
        return t.float().pow(2).sum(dim=(1, 3)).sqrt().reshape(-1)

    def group_sizes(self) -> Tensor:
        r = torch.full((self.n_r,), self.rows)
        r[-1] = self.out - (self.n_r - 1) * self.rows
        c = torch.full((self.n_c,), self.cols)
        c[-1] = self.width - (self.n_c - 1) * self.cols
        return torch.outer(r, c).reshape(-1).float()

    def expand(self, mask: Tensor) -> Tensor:
        """[num_groups] -> weight-shaped mask (differentiable)."""
        assert mask.numel() == self.num_groups, f"{self.name}: mask has {mask.numel()} != {self.num_groups}"
        m = mask.reshape(self.n_r, 1, self.n_c, 1).expand(self.n_r, self.rows, self.n_c, self.cols)
        m = m.reshape(self.n_r * self.rows, self.n_c * self.cols)[: self.out, : self.width]
        return m.reshape(self.weight_shape)
