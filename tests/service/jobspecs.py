"""Job request bodies (without `model_id`) shared by the fault tests and bench/reliability_load.py."""

from __future__ import annotations

from typing import Any

# A few seconds of real work: prune + fine-tune + export + latency measurement of the tiny conv net.
QUICK: dict[str, Any] = {"method": "magnitude", "granularity": "channel", "accelerator": "cpu",
                         "target_sparsity": 0.5, "steps": 2, "batch_size": 4, "latency_seconds": 0.5}
