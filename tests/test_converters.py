"""Each converter we add to onnx2torch, on a hand-built ONNX graph, checked against ONNX Runtime.

`load_model` already refuses a graph whose conversion disagrees with ONNX Runtime; these tests also
compare outputs themselves (so they fail if verification were silently skipped) and check the structure
that the pruners rely on (nn.Linear, trainable weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pruning_core.errors import ModelRejected, UnsupportedOp
from pruning_core.ingest import load_model

# Same kernels in float32 on tiny graphs: differences are a few ulps; 1e-5 relative is a wide margin.
RTOL, ATOL = 1e-5, 1e-6


def _model(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int | str], int]],
    outputs: list[str],  # all float except one named "s" (a Shape output)
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 18,
    extra_opsets: dict[str, int] | None = None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, s, t in inputs],
        [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "s" else TensorProto.FLOAT, None)
         for n in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def _torch(module: nn.Module, *xs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(x) for x in xs])
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.numpy() for o in outs]


def _assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def _x(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("op", "axes", "keepdims"), [("ReduceMean", [2, 3], 1), ("ReduceMean", [-1], 0),
                                                      ("ReduceMax", [1], 1), ("ReduceL2", [1, 2], 0)])
def test_reduce_v18_axes_input(tmp_path: Path, op: str, axes: list[int], keepdims: int) -> None:
    node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
    path = _model(tmp_path, [node], [("x", [1, 3, 4, 5], TensorProto.FLOAT)], ["y"],
                  {"axes": np.array(axes, dtype=np.int64)}, opset=18)
    loaded = load_model(path)
    x = _x(1, 3, 4, 5)
    _assert_same(_torch(loaded.module, x), _ort(path, {"x": x}))


def test_reduce_v18_without_axes_reduces_everything(tmp_path: Path) -> None:
    node = helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)
    path = _model(tmp_path, [node], [("x", [2, 3], TensorProto.FLOAT)], ["y"], opset=18)
    x = _x(2, 3)
    got = _torch(load_model(path).module, x)
    assert got[0].shape == ()
    _assert_same(got, _ort(path, {"x": x}))


def test_split_v18_num_outputs_uneven(tmp_path: Path) -> None:
    # 7 along axis 1 in 3 outputs: ONNX v18 says ceil(7/3)=3, 3, then the remainder 1.
    node = helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
    path = _model(tmp_path, [node], [("x", [2, 7], TensorProto.FLOAT)], ["a", "b", "c"], opset=18)
    x = _x(2, 7)
    got = _torch(load_model(path).module, x)
    assert [g.shape[1] for g in got] == [3, 3, 1]
    _assert_same(got, _ort(path, {"x": x}))


def test_split_v18_sizes_input(tmp_path: Path) -> None:
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=-1)
    path = _model(tmp_path, [node], [("x", [2, 7], TensorProto.FLOAT)], ["a", "b"],
                  {"sizes": np.array([2, 5], dtype=np.int64)}, opset=18)
    x = _x(2, 7)
    got = _torch(load_model(path).module, x)
    assert [g.shape[1] for g in got] == [2, 5]
    _assert_same(got, _ort(path, {"x": x}))


def test_reshape_allowzero_keeps_literal_zero(tmp_path: Path) -> None:
    # x is (3, 0); shape [0, 3] with allowzero=1 means a real 0 -> (0, 3). With allowzero=0 the 0 would
    # copy x's dim 0 (3) and the reshape of 0 elements into (3, 3) would fail.
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    path = _model(tmp_path, [node], [("x", [3, 0], TensorProto.FLOAT)], ["y"],
                  {"shape": np.array([0, 3], dtype=np.int64)}, opset=18)
    x = np.zeros((3, 0), dtype=np.float32)
    got = _torch(load_model(path).module, x)
    assert got[0].shape == (0, 3)
    _assert_same(got, _ort(path, {"x": x}))


def test_reshape_allowzero_regular_shape(tmp_path: Path) -> None:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    path = _model(tmp_path, [node], [("x", [2, 3, 4], TensorProto.FLOAT)], ["y"],
                  {"shape": np.array([2, -1], dtype=np.int64)}, opset=19)
    x = _x(2, 3, 4)
    _assert_same(_torch(load_model(path).module, x), _ort(path, {"x": x}))


def test_pad_v18_without_axes(tmp_path: Path) -> None:
    node = helper.make_node("Pad", ["x", "pads", "value"], ["y"], mode="constant")
    path = _model(tmp_path, [node], [("x", [1, 2, 3, 3], TensorProto.FLOAT)], ["y"],
                  {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64), "value": np.array(0.5, np.float32)},
                  opset=18)
    x = _x(1, 2, 3, 3)
    got = _torch(load_model(path).module, x)
    assert got[0].shape == (1, 2, 6, 6)
    _assert_same(got, _ort(path, {"x": x}))


def test_pad_v18_with_axes_is_refused_by_name(tmp_path: Path) -> None:
    node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])
    path = _model(tmp_path, [node], [("x", [1, 2, 3, 3], TensorProto.FLOAT)], ["y"],
                  {"pads": np.array([1, 1, 1, 1], dtype=np.int64), "axes": np.array([2, 3], dtype=np.int64)},
                  opset=18)
    with pytest.raises(ModelRejected, match="Pad with an 'axes' input"):
        load_model(path)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_v20(tmp_path: Path, approximate: str) -> None:
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    path = _model(tmp_path, [node], [("x", [4, 8], TensorProto.FLOAT)], ["y"], opset=20)
    x = _x(4, 8)
    module = load_model(path).module
    assert any(isinstance(m, nn.GELU) and m.approximate == approximate for m in module.modules())
    _assert_same(_torch(module, x), _ort(path, {"x": x}))


def test_matmul_with_constant_weight_is_trainable_linear(tmp_path: Path) -> None:
    w = _x(8, 5)  # (in, out) as MatMul stores it
    b = _x(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    path = _model(tmp_path, nodes, [("x", ["batch", 3, 8], TensorProto.FLOAT)], ["y"], {"w": w, "b": b})
    loaded = load_model(path, input_shape=[2, 3, 8])
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (5, 8)
    np.testing.assert_array_equal(linears[0].weight.detach().numpy(), w.T)
    # The separate Add of a constant vector became the Linear's bias (fx_passes.fuse_linear_bias).
    assert linears[0].bias is not None
    np.testing.assert_array_equal(linears[0].bias.detach().numpy(), b)
    assert not [n for n in loaded.module.graph.nodes if n.op == "get_attr"]
    params = dict(loaded.module.named_parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params.values())
    assert not [n for n, t in loaded.module.named_buffers() if t.is_floating_point()]
    x = _x(2, 3, 8)
    _assert_same(_torch(loaded.module, x), _ort(path, {"x": x}))


def test_add_of_activation_is_not_fused_as_bias(tmp_path: Path) -> None:
    # MatMul + Add where the added tensor is another input, not a constant: must stay an Add.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "r"], ["y"])]
    path = _model(tmp_path, nodes, [("x", [2, 8], TensorProto.FLOAT), ("r", [2, 5], TensorProto.FLOAT)], ["y"],
                  {"w": _x(8, 5)})
    loaded = load_model(path)
    linear = next(m for m in loaded.module.modules() if isinstance(m, nn.Linear))
    assert linear.bias is None
    x, r = _x(2, 8), _x(2, 5) + 1
    _assert_same(_torch(loaded.module, x, r), _ort(path, {"x": x, "r": r}))


def test_matmul_of_two_activations_stays_matmul(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    path = _model(tmp_path, nodes, [("a", [2, 3, 4], TensorProto.FLOAT), ("b", [2, 4, 5], TensorProto.FLOAT)], ["y"])
    loaded = load_model(path)
    assert not [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    a, b = _x(2, 3, 4), _x(2, 4, 5)
    _assert_same(_torch(loaded.module, a, b), _ort(path, {"a": a, "b": b}))


def test_gemm_with_row_bias_alpha_beta_is_linear(tmp_path: Path) -> None:
    # Bias of shape (1, N) and alpha/beta != 1 made onnx2torch fall back to a buffer-based Gemm.
    w, c = _x(6, 4), _x(1, 4)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=0)
    path = _model(tmp_path, [node], [("x", ["batch", 6], TensorProto.FLOAT)], ["y"], {"w": w, "c": c}, opset=13)
    loaded = load_model(path)
    linears = [m for m in loaded.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is not None and linears[0].weight.requires_grad
    x = _x(3, 6)
    _assert_same(_torch(loaded.module, x), _ort(path, {"x": x}))


def test_opset21_type_only_bumps(tmp_path: Path) -> None:
    # Cast/Transpose/Unsqueeze/Flatten/Shape/Identity all got new versions in opsets 19-21 that only
    # widened their type lists; the aliases must convert them.
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Identity", ["t"], ["i"]),
        helper.make_node("Unsqueeze", ["i", "ax"], ["u"]),
        helper.make_node("Flatten", ["u"], ["f"], axis=1),
        helper.make_node("Cast", ["f"], ["y"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    path = _model(tmp_path, nodes, [("x", [2, 3, 4], TensorProto.FLOAT)], ["y", "s"],
                  {"ax": np.array([1], dtype=np.int64)}, opset=21)
    x = _x(2, 3, 4)
    _assert_same(_torch(load_model(path).module, x), _ort(path, {"x": x}))


def test_averagepool_v19_dilations_refused(tmp_path: Path) -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])
    path = _model(tmp_path, [node], [("x", [1, 1, 6, 6], TensorProto.FLOAT)], ["y"], opset=19)
    with pytest.raises(ModelRejected, match="AveragePool with dilations"):
        load_model(path)


def test_averagepool_v19_plain(tmp_path: Path) -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    path = _model(tmp_path, [node], [("x", [1, 1, 6, 6], TensorProto.FLOAT)], ["y"], opset=19)
    x = _x(1, 1, 6, 6)
    _assert_same(_torch(load_model(path).module, x), _ort(path, {"x": x}))


def test_unsupported_standard_op_named_with_opset(tmp_path: Path) -> None:
    node = helper.make_node("Det", ["x"], ["y"])
    path = _model(tmp_path, [node], [("x", [3, 3], TensorProto.FLOAT)], ["y"], opset=17)
    with pytest.raises(UnsupportedOp, match=r"ai\.onnx::Det \(opset 17\)") as info:
        load_model(path)
    assert info.value.op_type == "Det" and info.value.opset == 17


def test_unsupported_custom_domain_op_named(tmp_path: Path) -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")
    path = _model(tmp_path, [node], [("x", [3], TensorProto.FLOAT)], ["y"], extra_opsets={"com.acme": 2})
    with pytest.raises(UnsupportedOp, match=r"com\.acme::Frobnicate \(opset 2\)"):
        load_model(path)
