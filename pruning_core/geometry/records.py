"""Per-layer records for `report["layers"]`: every Conv/Linear weight layer, pruned or kept, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LayerRecord:
    """One weight layer (Conv/Linear) of the model.

    `groups`/`kept` count the layer's pruning groups (block tiles, single weights for N:M, output channels
    for channel pruning); `sparsity` is zero weights / weights of the dense layer, where physically
    removed weights (channel pruning) count as zeros. Filled by `PruningPlan.finalize`.
    """

    name: str
    op_type: str
    weight_shape: tuple[int, ...]
    prunable: bool
    reason: str
    groups: int = 0
    kept: int = 0
    sparsity: float = 0.0
    pruned_shape: tuple[int, ...] | None = None  # weight shape after finalize (channel pruning shrinks it)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["pruned_shape"] = list(self.pruned_shape) if self.pruned_shape is not None else None
        return d
