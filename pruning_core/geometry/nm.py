"""N:M geometry for sparse tensor cores: keep exactly N of every M consecutive weights along the input.

Linear `(out, in)`: runs of M consecutive `in` weights of a row. Conv `(out, in, kh, kw)`: runs of M
consecutive input channels at each `(out, kh, kw)` position, which is what Ampere sparse tensor cores and
TensorRT execute (the reduction dimension of the implicit GEMM). Groups are single weights ordered so that
each run of M is contiguous: weights are permuted to `(out, kh, kw, in)` and flattened. A layer whose input
dimension is not a multiple of M is kept (decided by the policy, not here).
Reference: Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (2:4); SMART (arXiv 2403.19969).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pruning_core.geometry.masking import raw_tensor
from pruning_core.geometry.units import PruningUnit


def _to_runs(w: Tensor) -> Tensor:
    """Weight -> flat vector in which every M consecutive entries form one run."""
    return w.permute(0, *range(2, w.dim()), 1).reshape(-1) if w.dim() > 2 else w.reshape(-1)


class NMUnit(PruningUnit):
    def __init__(self, name: str, module: nn.Module, nm: tuple[int, int]) -> None:
        self.name, self.module = name, module
        self.nm_n, self.nm_m = nm
        w = raw_tensor(module, "weight")
        assert w.shape[1] % self.nm_m == 0, f"{name}: input dim {w.shape[1]} not a multiple of M={self.nm_m}"
        self.weight_shape = tuple(w.shape)
        self.num_groups = w.numel()
        self.mask = None

    def group_norms(self) -> Tensor:
        return _to_runs(raw_tensor(self.module, "weight").detach()).float().abs()

    def group_sizes(self) -> Tensor:
        return torch.ones(self.num_groups)

    def expand(self, mask: Tensor) -> Tensor:
        assert mask.numel() == self.num_groups, f"{self.name}: mask has {mask.numel()} != {self.num_groups}"
        shape = self.weight_shape
        if len(shape) == 2:
            return mask.reshape(shape)
        permuted = mask.reshape(shape[0], *shape[2:], shape[1])  # (out, kh, kw, in)
        return permuted.permute(0, len(shape) - 1, *range(1, len(shape) - 1))
