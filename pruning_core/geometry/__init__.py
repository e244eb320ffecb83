"""Pruning geometry: block tiles, N:M runs and coupled channels, with masks, selection and finalisation."""

from pruning_core.geometry.block import BlockUnit
from pruning_core.geometry.channel import ChannelUnit
from pruning_core.geometry.nm import NMUnit
from pruning_core.geometry.plan import GRANULARITIES, PruningPlan, build_plan, require_prunable
from pruning_core.geometry.records import LayerRecord
from pruning_core.geometry.select import min_kept, nm_mask, select_masks
from pruning_core.geometry.units import PruningUnit

__all__ = [
    "GRANULARITIES", "BlockUnit", "ChannelUnit", "LayerRecord", "NMUnit", "PruningPlan", "PruningUnit",
    "build_plan", "min_kept", "nm_mask", "require_prunable", "select_masks",
]
