"""The .npz dataset contract: numeric arrays only, never unpickled, shapes checked against the model."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pruning_core.data import inspect_dataset, load_dataset, synthetic_data
from pruning_core.errors import DatasetRejected


def _save(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_labelled_dataset_round_trips(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 3, 4, 4)).astype(np.float32)
    y = np.arange(10) % 3
    info = inspect_dataset(_save(tmp_path, inputs=x, labels=y))
    assert (info.samples, info.has_labels, info.input_shape, info.num_classes) == (10, True, [3, 4, 4], 3)
    data = load_dataset(tmp_path / "d.npz", [1, 3, 4, 4])
    assert data.source == "labelled" and torch.equal(data.inputs, torch.from_numpy(x))
    assert data.labels is not None and data.labels.dtype == torch.int64


def test_object_arrays_are_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DatasetRejected, match="object arrays"):
        inspect_dataset(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 3))}, "must contain an 'inputs'"),
        ({"inputs": np.zeros((2, 3)), "labels": np.zeros(3, dtype=np.int64)}, "3 entries"),
        ({"inputs": np.zeros((2, 3)), "labels": np.zeros(2, dtype=np.float32)}, "integer"),
        ({"inputs": np.full((2, 3), np.nan)}, "NaN"),
    ],
)
def test_malformed_datasets_say_what_is_wrong(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(DatasetRejected, match=message):
        inspect_dataset(_save(tmp_path, **arrays))


def test_not_a_zip_and_wrong_sample_shape(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DatasetRejected, match=r"\.npz file"):
        inspect_dataset(bad)
    path = _save(tmp_path, inputs=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(DatasetRejected, match="model takes"):
        load_dataset(path, [1, 3, 16, 16])


def test_split_is_seeded_and_disjoint() -> None:
    data = synthetic_data([1, 5], seed=0, samples=50)
    a, b = data.split(0.2, seed=1)
    a2, _ = data.split(0.2, seed=1)
    assert len(a) == 40 and len(b) == 10 and torch.equal(a.inputs, a2.inputs)
    rows = {tuple(r.tolist()) for r in a.inputs} & {tuple(r.tolist()) for r in b.inputs}
    assert not rows
    assert "NO DATA GIVEN" in data.description


def test_unsupported_op_survives_pickling() -> None:
    import pickle

    from pruning_core.errors import UnsupportedOp

    err = pickle.loads(pickle.dumps(UnsupportedOp("Frobnicate", 2, "com.acme", "no converter")))
    assert isinstance(err, UnsupportedOp)
    assert str(err) == "unsupported ONNX op com.acme::Frobnicate (opset 2): no converter"


def test_budget_beyond_min_keep_is_refused_with_advice() -> None:
    from pruning_core.errors import InvalidRequest
    from pruning_core.spec import PruneSpec

    PruneSpec(target_sparsity=0.97)  # the default min_keep (1%) admits the paper's highest sparsity
    with pytest.raises(InvalidRequest, match="lower min_keep"):
        PruneSpec(target_sparsity=0.97, min_keep=0.05)
