"""SMART pruner (Ding et al., arXiv 2403.19969): separate learnable masks, differentiable top-k, dynamic tau."""

from pruning_core.methods.smart.config import SmartConfig
from pruning_core.methods.smart.pruner import SmartPruner, SmartResult, init_scores, run_smart
from pruning_core.methods.smart.temperature import Temperature
from pruning_core.methods.smart.topk import SoftTopK, soft_topk

__all__ = ["SmartConfig", "SmartPruner", "SmartResult", "SoftTopK", "Temperature", "init_scores", "run_smart",
           "soft_topk"]
