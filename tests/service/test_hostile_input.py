"""Hostile and broken input (issue 7): each gets a clear 4xx or a failed job with a reason, and the worker keeps
serving good jobs afterwards. Cases already covered by test_service_api.py (plain garbage, oversized streaming
upload, object-array npz, `input_shape` "1,3,x", unknown profile, sparsity > 1) are not repeated here.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from api.app import create_app
from db.keys import create_key
from db.migrate import upgrade
from db.session import make_engine, make_session_factory, transaction
from hwprune.settings import Settings
from tests.service.conftest import ApiHarness, poll_job
from worker.embedded import EmbeddedWorker

PROBLEM = "application/problem+json"
QUICK = {"method": "magnitude", "granularity": "channel", "accelerator": "cpu", "target_sparsity": 0.5,
         "steps": 2, "batch_size": 4, "latency_seconds": 0.5}


def _post_model(api: ApiHarness, name: str, data: bytes, **form: str) -> Any:
    return api.client.post("/v1/models", headers=api.h(), files={"file": (name, data)}, data=form or None)


def _assert_problem(r: Any, status: int, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM
    detail = r.json()["detail"].lower()
    for n in needles:
        assert n.lower() in detail, (n, detail)


def _onnx_with_initializer(tensor: TensorProto) -> bytes:
    """A one-node Add graph whose second operand is `tensor` (the hostile part)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", tensor.name], ["y"])], "g", [x], [y], [tensor])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:  # length-delimited protobuf field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def deeply_nested_model(depth: int) -> bytes:
    """ModelProto.graph -> GraphProto.node -> NodeProto.attribute -> AttributeProto.g -> ... `depth` times:
    valid protobuf wire format, nested far beyond any parser's recursion limit, only ~100 KB."""
    graph = b""
    for _ in range(depth):
        attribute = _field(6, graph)  # AttributeProto.g = 6
        node = _field(5, attribute)  # NodeProto.attribute = 5
        graph = _field(1, node)  # GraphProto.node = 1
    return _varint(1 << 3 | 0) + _varint(8) + _field(7, graph)  # ir_version = 8, ModelProto.graph = 7


class _Bomb:
    """Unpickling this would create a file: the marker proves no unpickling happened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# --- uploads that must be refused ---------------------------------------------------------------------------

def test_truncated_and_random_uploads(api: ApiHarness, tiny_onnx: Path) -> None:
    data = tiny_onnx.read_bytes()
    for cut in (len(data) // 2, len(data) - 7, 40):
        r = _post_model(api, "t.onnx", data[:cut])
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, (cut, r.text)
    rnd = np.random.default_rng(0)
    for name in ("r.onnx", "r.pt", "r.bin", "r"):
        r = _post_model(api, name, rnd.bytes(4096), input_shape="1,3,16,16")
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, (name, r.text)
    assert _post_model(api, "empty.onnx", b"").status_code == 422
    assert api.client.get("/v1/models", headers=api.h()).json()["items"] == []


def test_zip_that_is_not_torchscript_and_a_pickle_bomb(api: ApiHarness, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    _assert_problem(_post_model(api, "m.pt", buf.getvalue(), input_shape="1,3,8,8"), 422)

    # A TorchScript-shaped archive whose data.pkl would run code if anything unpickled it.
    marker = tmp_path / "pwned"
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Bomb(marker)))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/constants.pkl", pickle.dumps(_Bomb(marker)))
    _assert_problem(_post_model(api, "m.pt", bomb.getvalue(), input_shape="1,3,8,8"), 422)
    assert not marker.exists(), "the upload was unpickled"


def test_external_data_outside_the_folder(api: ApiHarness) -> None:
    t = helper.make_tensor("w", TensorProto.FLOAT, [1, 4], vals=[0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for loc in ("../../etc/passwd", "/etc/passwd"):
        del t.external_data[:]
        t.external_data.add(key="location", value=loc)
        r = _post_model(api, "ext.onnx", _onnx_with_initializer(t))
        _assert_problem(r, 422, "external data")
        assert "root:" not in r.text, "file contents leaked into the answer"


def test_absurd_tensor_sizes(api: ApiHarness) -> None:
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])  # 4 TiB, declared only
    _assert_problem(_post_model(api, "huge.onnx", _onnx_with_initializer(huge)), 422, "elements")
    liar = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4], raw_data=bytes(8))  # needs 16 bytes
    _assert_problem(_post_model(api, "liar.onnx", _onnx_with_initializer(liar)), 422)


def test_deeply_nested_protobuf(api: ApiHarness) -> None:
    data = deeply_nested_model(3000)
    assert len(data) < api.settings.max_upload_bytes
    with pytest.raises(Exception):  # noqa: B017 -- any parser error: the point is that it does not crash us
        onnx.load_from_string(data)
    _assert_problem(_post_model(api, "deep.onnx", data), 422)
    assert api.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("shape", ["", " ", "0,3,16,16", "-1,3,16,16", "1,3,16", "1;3;16;16", "1,3,1e9,16",
                                   "1,3,99999999,99999999", ",".join(["1"] * 40), "1,3,16,16" * 50])
def test_nonsense_input_shapes(api: ApiHarness, tmp_path: Path, shape: str) -> None:
    import torch
    from torch import nn

    path = tmp_path / "m.pt"
    torch.jit.trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval(), torch.randn(1, 3, 8, 8)).save(str(path))
    r = _post_model(api, "m.pt", path.read_bytes(), input_shape=shape)
    assert 400 <= r.status_code < 500 and r.headers["content-type"] == PROBLEM, (shape, r.status_code, r.text)


@pytest.mark.parametrize(("patch", "needle"), [
    ({"target_sparsity": 1.0}, "target_sparsity"),
    ({"granularity": "nm", "accelerator": {"block_shape": [1, 1], "nm": [4, 2], "channel_multiple": 1}}, "n:m"),
    ({"granularity": "block", "accelerator": {"block_shape": [0, 4], "nm": [2, 4], "channel_multiple": 1}},
     "block"),
    ({"accelerator": "npu-4x4\x00; rm -rf /"}, "npu"),
    ({"steps": -1}, "steps"),
    ({"batch_size": 10**9}, "batch_size"),
    ({"model_id": "../../etc/passwd"}, "model"),
])
def test_impossible_job_parameters(api: ApiHarness, tiny_onnx: Path, patch: dict[str, Any], needle: str) -> None:
    model_id = _post_model(api, "tiny.onnx", tiny_onnx.read_bytes()).json()["id"]
    r = api.client.post("/v1/jobs", headers=api.h(), json={"model_id": model_id, **QUICK, **patch})
    assert r.status_code in (404, 422), (patch, r.status_code, r.text)
    assert r.headers["content-type"] == PROBLEM and needle in r.text.lower(), (needle, r.text)


# --- jobs that fail in the worker, and the worker still serves ----------------------------------------------

@pytest.fixture()
def embedded(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The embedded default (SQLite + worker thread): the same runner code the Celery worker runs."""
    settings = Settings(data_dir=tmp_path / "data", progress_interval_s=0.2)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_session_factory(engine)) as s:
        key = create_key(s, "hostile")[1]
    engine.dispose()
    with TestClient(create_app(settings, EmbeddedWorker(settings))) as client:
        yield client, {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_failing_jobs_give_reasons_and_the_worker_keeps_serving(embedded: tuple[TestClient, dict[str, str]],
                                                                 tiny_onnx: Path) -> None:
    client, h = embedded
    with open(tiny_onnx, "rb") as fh:
        model_id = client.post("/v1/models", headers=h, files={"file": ("t.onnx", fh)}).json()["id"]

    def dataset(inputs: np.ndarray) -> Any:
        buf = io.BytesIO()
        np.savez(buf, inputs=inputs)
        return client.post("/v1/datasets", headers=h, files={"file": ("d.npz", buf.getvalue())})

    nan = dataset(np.full((8, 3, 16, 16), np.nan, np.float32))
    assert nan.status_code == 422 and "nan" in nan.json()["detail"].lower(), nan.text
    r = dataset(np.random.rand(8, 5, 7, 7).astype(np.float32))  # the model takes 3x16x16
    assert r.status_code == 201, r.text
    wrong_shape = r.json()["id"]
    cases = {
        "wrong_shape": {"dataset_id": wrong_shape},
        # 64x64 blocks: larger than every weight of the tiny net (3x16x3x3, 16x16x3x3, 10x16).
        "big_block": {"granularity": "block",
                      "accelerator": {"block_shape": [64, 64], "nm": [2, 4], "channel_multiple": 1}},
    }
    ids = {}
    for name, patch in cases.items():
        r = client.post("/v1/jobs", headers=h, json={"model_id": model_id, **QUICK, **patch})
        if r.status_code == 422:  # refused up front: as good as a failed job, as long as it says why
            assert name != "wrong_shape" or "shape" in r.json()["detail"].lower(), r.text
            continue
        assert r.status_code == 202, r.text
        ids[name] = r.json()["id"]
    good = client.post("/v1/jobs", headers=h, json={"model_id": model_id, **QUICK}).json()["id"]
    results = {name: poll_job(client, j, h, timeout=240) for name, j in ids.items()}
    if "wrong_shape" in results:
        failed = results["wrong_shape"]
        assert failed["status"] == "failed" and "shape" in failed["error"].lower(), failed
    for name, job in results.items():
        assert job["status"] in ("failed", "succeeded"), (name, job)
        if job["status"] == "failed":
            assert job["error"] and "internal error" not in job["error"], (name, job)
    # Blocks larger than a weight are clipped to it (one block per weight): a legitimate, if coarse, plan --
    # measured: succeeded at achieved sparsity 0.5. Either way the job must end with a number or a reason.
    if "big_block" in results and results["big_block"]["status"] == "succeeded":
        assert 0 < results["big_block"]["achieved_sparsity"] < 1, results["big_block"]
    done = poll_job(client, good, h, timeout=240)
    assert done["status"] == "succeeded", ("the worker must keep serving after hostile jobs", done)
    assert os.path.getsize(tiny_onnx) > 0


# --- hostile tenants and stolen paths (security) ------------------------------------------------------------

def test_every_route_hides_another_tenants_objects(api: ApiHarness, tiny_onnx: Path) -> None:
    """Walks the OpenAPI document, so a route added later is covered too: with tenant B's key, every path that
    names one of A's objects answers 404, and every list (even filtered by A's ids) is empty."""
    model_id = _post_model(api, "tiny.onnx", tiny_onnx.read_bytes()).json()["id"]
    buf = io.BytesIO()
    np.savez(buf, inputs=np.random.rand(4, 3, 16, 16).astype(np.float32))
    dataset_id = api.client.post("/v1/datasets", headers=api.h(), files={"file": ("d.npz", buf.getvalue())}
                                 ).json()["id"]
    job_id = api.client.post("/v1/jobs", headers=api.h(), json={"model_id": model_id, **QUICK}).json()["id"]
    ids = {"model_id": model_id, "dataset_id": dataset_id, "job_id": job_id, "name": "report.json"}
    b = api.h(api.key_b)
    checked = 0
    for path, ops in api.client.get("/openapi.json").json()["paths"].items():
        for method in ops:
            if "{" in path:
                url = path.format(**ids)
                r = api.client.request(method.upper(), url, headers=b)
                assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, (method, url, r.text)
                assert all(v not in r.text for v in (model_id, dataset_id, job_id) if v not in url), r.text
                checked += 1
            elif method == "get" and path.startswith("/v1/") and path != "/v1/accelerators":
                for params in ({}, {"model_id": model_id}, {"status": "queued"}):
                    r = api.client.get(path, headers=b, params=params)
                    assert r.status_code in (200, 422), (path, params, r.text)
                    assert not any(v in r.text for v in (model_id, dataset_id, job_id)), (path, params)
                checked += 1
    assert checked >= 8, "the walk must reach the id routes and the lists"
    # Using A's dataset in B's job, or A's model: 404, never a job.
    b_model = _post_model(api, "tiny.onnx", tiny_onnx.read_bytes())
    r = api.client.post("/v1/jobs", headers=b, json={"model_id": b_model.json()["id"], "dataset_id": dataset_id,
                                                      **QUICK})
    assert r.status_code == 404, r.text


def test_keys_are_stored_hashed(api: ApiHarness) -> None:
    import hashlib

    from sqlalchemy import create_engine, text

    engine = create_engine(api.settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT prefix, key_hash FROM api_keys")).all()
            dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")).all() for v in row)
    finally:
        engine.dispose()
    secret = api.key_a.rsplit("_", 1)[1]
    assert secret not in dump and api.key_a not in dump, "the key must not be stored in clear"
    assert hashlib.sha256(api.key_a.encode()).hexdigest() in {h for _, h in rows}
    # A key differing only in its secret part is refused (the prefix alone finds the row, the hash decides).
    forged = api.key_a[:-4] + ("AAAA" if not api.key_a.endswith("AAAA") else "BBBB")
    assert api.client.get("/v1/models", headers=api.h(forged)).status_code == 401


def test_artifact_paths_never_come_from_user_strings(api: ApiHarness, tiny_onnx: Path) -> None:
    data_dir = api.settings.data_dir.resolve()
    outside = data_dir.parent / "evil.onnx"
    r = api.client.post("/v1/models", headers=api.h(), files={"file": ("../../evil.onnx", tiny_onnx.read_bytes())},
                        data={"name": "../../../evil"})
    assert r.status_code == 201, r.text
    assert not outside.exists()
    stored = [p for p in data_dir.rglob("*") if p.is_file() and p.suffix == ".onnx"]
    assert stored and all(p.resolve().is_relative_to(data_dir) for p in stored)
    assert all("evil" not in str(p) for p in stored), stored
    # Artifact names are a fixed list: traversal in the name is a 404, not a file read.
    job = api.client.post("/v1/jobs", headers=api.h(), json={"model_id": r.json()["id"], **QUICK}).json()
    for name in ("..%2F..%2Fhwprune.db", "../model.onnx", "%2e%2e"):
        got = api.client.get(f"/v1/jobs/{job['id']}/artifacts/{name}", headers=api.h())
        assert got.status_code == 404, (name, got.status_code)
