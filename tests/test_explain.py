"""explain(): the cost models' numbers, worked by hand, and the plain-words reasons per granularity."""

from __future__ import annotations

import pytest

from pruning_core.accelerators import BUILTIN_PROFILES, resolve_profile
from pruning_core.explain import CostModel, explain


def _lat(dense: float, pruned: float) -> dict:
    s = {"p90": 0.0, "mean": 0.0, "runs": 30, "provider": "CPUExecutionProvider", "threads": 2}
    return {"dense": {**s, "median": dense}, "pruned": {**s, "median": pruned}}


LAYERS = [  # two prunable layers of 600 and 300 MACs, a kept classifier of 100
    {"name": "a", "prunable": True, "sparsity": 0.75, "macs": 600, "weight_shape": [16, 8, 3, 3]},
    {"name": "b", "prunable": True, "sparsity": 0.5, "macs": 300, "weight_shape": [16, 16, 1, 1]},
    {"name": "fc", "prunable": False, "sparsity": 0.0, "macs": 100, "weight_shape": [10, 16]},
]


def test_block_cost_model_per_layer() -> None:
    prof = BUILTIN_PROFILES["npu-4x4"]
    e = explain("block", prof, LAYERS, {"dense": 1000, "pruned": 1000}, _lat(10.0, 9.9), "CPUExecutionProvider")
    # by hand: overhead 1/16 per kept MAC; a: 600*.25*1.0625=159.375, b: 300*.5*1.0625=159.375, fc: 100
    assert e["estimated_accelerator_speedup"] == pytest.approx(1000 / 418.75, abs=1e-4)
    assert e["measured_speedup"] == pytest.approx(10.0 / 9.9, abs=1e-4)
    assert "dense kernels" in e["summary"] and "cannot skip zero weight blocks" in e["summary"]
    assert "within measurement noise" in e["summary"]
    assert "npu-4x4" in e["summary"] and "4x4" in e["cost_model"]
    assert [d["layer"] for d in e["details"]] == ["a", "b", "fc"]
    assert e["details"][2]["estimated_cost_fraction"] == 1.0


def test_smaller_tiles_pay_more_overhead() -> None:
    args = (LAYERS, {"dense": 1000, "pruned": 1000}, _lat(1.0, 1.0), "CPUExecutionProvider")
    small = explain("block", BUILTIN_PROFILES["npu-1x4"], *args)["estimated_accelerator_speedup"]
    large = explain("block", BUILTIN_PROFILES["npu-16x16"], *args)["estimated_accelerator_speedup"]
    assert small < large  # same sparsity: 1/4 vs 1/256 index overhead per kept MAC


def test_block_without_layer_macs_uses_effective_total() -> None:
    layers = [{k: v for k, v in ly.items() if k != "macs"} for ly in LAYERS]
    e = explain("block", BUILTIN_PROFILES["npu-8x8"], layers, {"dense": 1000, "pruned": 1000, "effective": 400},
                _lat(1.0, 1.0), "CPUExecutionProvider")
    assert e["estimated_accelerator_speedup"] == pytest.approx(1000 / (400 * (1 + 1 / 64)), abs=1e-4)
    assert "effective" in e["cost_model"]


def test_nm_on_sparse_tensor_cores() -> None:
    layers = [{**LAYERS[0], "sparsity": 0.5}, {**LAYERS[1], "sparsity": 0.5}, LAYERS[2]]
    e = explain("nm", BUILTIN_PROFILES["gpu-2of4"], layers, {"dense": 1000, "pruned": 1000},
                _lat(5.0, 5.0), "CPUExecutionProvider")
    # by hand: (600 + 300) * (0.5 + 0.05) + 100 = 595
    assert e["estimated_accelerator_speedup"] == pytest.approx(1000 / 595, abs=1e-4)
    assert "2:4" in e["summary"] and "dense kernels" in e["summary"]
    # the same from the aggregate: effective = 1000 - 450 skipped MACs -> N:M layers had 900 MACs
    agg = explain("nm", BUILTIN_PROFILES["gpu-2of4"], [{k: v for k, v in ly.items() if k != "macs"}
                  for ly in layers], {"dense": 1000, "pruned": 1000, "effective": 550}, _lat(5.0, 5.0),
                  "CPUExecutionProvider")
    assert agg["estimated_accelerator_speedup"] == pytest.approx(1000 / 595, abs=1e-4)


def test_profile_without_the_engine_estimates_no_speedup() -> None:
    e = explain("block", BUILTIN_PROFILES["cpu"], LAYERS, {"dense": 1000, "pruned": 1000}, _lat(1.0, 1.0),
                "CPUExecutionProvider")
    assert e["estimated_accelerator_speedup"] == 1.0
    assert "no block sparse engine" in e["summary"]


def test_channel_quotient_and_reasons() -> None:
    layers = [{**LAYERS[0], "pruned_shape": [8, 8, 3, 3]}, LAYERS[2]]
    lat = _lat(10.0, 6.0)
    e = explain("channel", BUILTIN_PROFILES["cpu"], layers, {"dense": 1000, "pruned": 500}, lat,
                "CPUExecutionProvider")
    assert e["measured_speedup"] == pytest.approx(10 / 6, abs=1e-4)
    assert e["estimated_accelerator_speedup"] == pytest.approx(2.0)
    assert e["quotient"] == pytest.approx((10 / 6) / 2, abs=1e-4)  # 0.83 < 0.9: the reasons are listed
    assert "physically removed" in e["summary"] and "memory-bound" in e["summary"]
    assert e["details"] == [{"layer": "a", "weight_shape": [16, 8, 3, 3], "pruned_shape": [8, 8, 3, 3]}]
    good = explain("channel", BUILTIN_PROFILES["cpu"], layers, {"dense": 1000, "pruned": 500}, _lat(10.0, 5.2),
                   "CPUExecutionProvider")
    assert "memory-bound" not in good["summary"]


def test_3d_is_explained_as_a_smaller_network() -> None:
    e = explain("channel+depth+resolution", BUILTIN_PROFILES["cpu"], LAYERS, {"dense": 1000, "pruned": 400},
                _lat(10.0, 4.0), "CPUExecutionProvider")
    assert e["estimated_accelerator_speedup"] == pytest.approx(2.5)
    assert e["quotient"] == pytest.approx(1.0)
    assert "network itself got smaller" in e["summary"] and "memory-bound" not in e["summary"]


def test_inline_profile_and_custom_cost_model() -> None:
    prof = resolve_profile({"block_shape": [2, 2]})
    e = explain("block", prof, LAYERS, {"dense": 1000, "pruned": 1000}, _lat(1.0, 1.0), "CPUExecutionProvider",
                cost=CostModel(block_tile_overhead_macs=0.0))
    # no overhead: time ~ kept MACs exactly: 150 + 150 + 100
    assert e["estimated_accelerator_speedup"] == pytest.approx(1000 / 400, abs=1e-4)
    assert e["cost_model_parameters"]["block_tile_overhead_macs"] == 0.0
