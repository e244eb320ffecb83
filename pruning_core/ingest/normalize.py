"""Normalise ONNX graphs before onnx2torch sees them.

Exporters leave patterns onnx2torch cannot convert or converts badly: initializers shared through
`Identity` nodes (the TorchScript exporter emits one per reused weight), `Constant` + `Transpose`
chains on weights (the dynamo exporter), shape sub-graphs that fold to constants. onnxslim removes
them (constant folding, dead-code and Identity elimination) without changing the graph's interface;
we check that promise because export later needs the original input/output names.
"""

from __future__ import annotations

import onnx
import onnxslim

from pruning_core.errors import ModelRejected


def _interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim-simplified copy of `model` with the same input and output names."""
    before = _interface(model)
    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:  # onnxslim failures are ours to report, not a traceback for the user
        raise ModelRejected(f"could not simplify the ONNX graph (onnxslim): {type(exc).__name__}: {exc}") from exc
    assert isinstance(slimmed, onnx.ModelProto), "onnxslim.slim returns a ModelProto for a ModelProto"
    after = _interface(slimmed)
    assert after == before, f"onnxslim changed the graph interface {before} -> {after}"
    return slimmed
