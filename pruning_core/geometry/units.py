"""The unit of scoring: a set of pruning groups that a method scores and masks together.

Methods (magnitude, SMART) see only this interface: group norms to initialise scores, group sizes to
normalise them, and `nm_m` to know when groups come in runs of M. How a group maps onto weights is the
subclass's business (block tiles, N:M runs, coupled channels).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class PruningUnit(ABC):
    """One independently scored set of `num_groups` groups."""

    name: str  # layer name (block/nm) or dependency-group root layer name (channel)
    num_groups: int
    nm_m: int | None = None  # N:M units: groups are single weights in consecutive runs of M
    nm_n: int | None = None  # N:M units: weights kept per run
    channel_multiple: int = 1  # channel units: kept counts are multiples of this (or all groups)
    mask: Tensor | None = None  # current mask [num_groups], None = all ones; set by PruningPlan.set_masks

    @abstractmethod
    def group_norms(self) -> Tensor:
        """[num_groups] L2 norm of each group's current (unmasked) weights."""

    @abstractmethod
    def group_sizes(self) -> Tensor:
        """[num_groups] number of weights in each group (ragged edge tiles are smaller)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, groups={self.num_groups})"
