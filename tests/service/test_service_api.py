"""The HTTP contract against real PostgreSQL + Redis: auth, uploads, validation, lists, isolation, cancel."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.service.conftest import ApiHarness

pytestmark = pytest.mark.services
PROBLEM = "application/problem+json"


def upload(api: ApiHarness, path: Path, key: str | None = None, **fields: str):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        return api.client.post("/v1/models", headers=api.h(key), files={"file": (path.name, fh)}, data=fields)


def job_body(model_id: str, **kw: object) -> dict[str, object]:
    return {"model_id": model_id, "method": "magnitude", "granularity": "channel", "accelerator": "cpu",
            "target_sparsity": 0.5, "steps": 5, **kw}


def test_health_is_open_everything_else_needs_a_key(api: ApiHarness) -> None:
    assert api.client.get("/healthz").json()["status"] == "ok"
    for path in ("/v1/models", "/v1/jobs", "/v1/datasets", "/v1/accelerators"):
        r = api.client.get(path)
        assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
        assert "Bearer" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    bad = api.client.get("/v1/models", headers={"Authorization": "Bearer hwp_000000000000_nope"})
    assert bad.status_code == 401 and bad.json()["detail"] == "unknown or revoked API key"
    # A real key with one character changed must fail too (hash compared, not just the prefix).
    forged = api.key_a[:-1] + ("A" if api.key_a[-1] != "A" else "B")
    assert api.client.get("/v1/models", headers=api.h(forged)).status_code == 401


def test_a_keyless_request_is_refused_before_its_body_is_read(api: ApiHarness) -> None:
    """FastAPI parses a JSON body before any dependency runs; the bearer gate answers 401 first, so what a keyless
    caller sends cannot change the answer (400 for a bad body and 413 for a large one, before the gate)."""
    cases = [
        ("post", "/v1/jobs", {"content": b"\x00" * 5, "headers": {"Content-Type": "application/json"}}),
        ("post", "/v1/jobs", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("post", "/v1/models", {"files": {"file": ("big.onnx", b"x" * (512 * 1024))}}),  # over max_upload_bytes
        ("get", "/v1/nowhere", {}),  # no such route: still a key first
        ("get", "/v1/jobs", {"headers": {"Authorization": "Bearer "}}),  # empty token
        ("get", "/v1/jobs", {"headers": {"Authorization": "Basic dTpw"}}),  # not a bearer scheme
    ]
    for method, path, kwargs in cases:
        r = getattr(api.client, method)(path, **kwargs)
        assert r.status_code == 401 and r.headers["content-type"] == PROBLEM, (path, kwargs, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["detail"]
        # an unread body: the connection closes after the answer (a keyless upload is not drained)
        assert (r.headers.get("connection") == "close") == (method == "post"), (path, r.headers.get("connection"))
    with_key = api.client.post("/v1/jobs", content=b"{not json", headers={**api.h(api.key_a),
                                                                          "Content-Type": "application/json"})
    assert with_key.status_code == 422 and with_key.headers["content-type"] == PROBLEM  # the body's own error


def test_openapi_lists_every_route_of_the_contract(api: ApiHarness) -> None:
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/models", "/v1/models/{model_id}", "/v1/datasets", "/v1/datasets/{dataset_id}",
              "/v1/accelerators", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events",
              "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/artifacts/{name}", "/healthz"):
        assert p in paths, p
    assert "multipart/form-data" in paths["/v1/models"]["post"]["requestBody"]["content"]
    assert "202" in paths["/v1/jobs"]["post"]["responses"]


def test_model_upload_reports_what_it_parsed(api: ApiHarness, tiny_onnx: Path) -> None:
    r = upload(api, tiny_onnx, name="tiny")
    assert r.status_code == 201, r.text
    m = r.json()
    assert r.headers["location"] == f"/v1/models/{m['id']}"
    assert m["format"] == "onnx" and m["name"] == "tiny" and isinstance(m["opset"], int)
    assert m["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    # params: conv1 3*16*9+16, conv2 16*16*9+16, fc 16*10+10
    assert m["params"] == (3 * 16 * 9 + 16) + (16 * 16 * 9 + 16) + (16 * 10 + 10)
    # MACs at 16x16: two convs over 256 positions + the linear head
    assert m["macs"] == 256 * 16 * 3 * 9 + 256 * 16 * 16 * 9 + 16 * 10
    assert m["sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    assert m["size_bytes"] == tiny_onnx.stat().st_size
    assert api.client.get(f"/v1/models/{m['id']}", headers=api.h()).json() == m
    stored = list((api.settings.data_dir / "tenants").rglob("model.onnx"))
    assert len(stored) == 1 and stored[0].read_bytes() == tiny_onnx.read_bytes()
    assert m["id"] in str(stored[0]) and "tiny" not in str(stored[0]), "artifact paths come from ids only"


def test_garbage_upload_is_a_422_that_says_so(api: ApiHarness, tmp_path: Path) -> None:
    junk = tmp_path / "weights.onnx"
    junk.write_bytes(b"definitely not a model" * 100)
    r = upload(api, junk)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert "onnx" in r.json()["detail"].lower()
    assert not list((api.settings.data_dir / "tmp").iterdir()), "rejected upload left a temp file"
    assert api.client.get("/v1/models", headers=api.h()).json()["items"] == []


def test_oversized_upload_is_cut_off_while_streaming(api: ApiHarness, tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * (api.settings.max_upload_bytes + 1))

    def chunks():  # no Content-Length: the limit must be enforced on the bytes as they arrive
        boundary = b"xyzzy"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
        data = big.read_bytes()
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]
        yield b"\r\n--" + boundary + b"--\r\n"

    r = api.client.post("/v1/models", headers={**api.h(), "content-type": "multipart/form-data; boundary=xyzzy"},
                        content=chunks())
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM, r.text
    assert "limit" in r.json()["detail"]
    assert not list((api.settings.data_dir / "tmp").iterdir()), "partial upload not removed"
    # With Content-Length the same upload is refused before reading the body.
    r2 = upload(api, big)
    assert r2.status_code == 413


def test_non_multipart_and_missing_file_are_explained(api: ApiHarness) -> None:
    r = api.client.post("/v1/models", headers=api.h(), json={"file": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = api.client.post("/v1/models", headers=api.h(), files={"other": ("a.onnx", b"x")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]


def test_dataset_upload_and_pickle_refusal(api: ApiHarness, tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, inputs=np.random.rand(12, 3, 16, 16).astype(np.float32), labels=np.arange(12) % 10)
    r = api.client.post("/v1/datasets", headers=api.h(), files={"file": ("d.npz", buf.getvalue())})
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["samples"], d["has_labels"], d["input_shape"]) == (12, True, [3, 16, 16])
    assert api.client.get(f"/v1/datasets/{d['id']}", headers=api.h()).json()["id"] == d["id"]
    assert api.client.get(f"/v1/datasets/{d['id']}", headers=api.h(api.key_b)).status_code == 404
    evil = io.BytesIO()
    np.savez(evil, inputs=np.array([{"a": 1}], dtype=object))
    r = api.client.post("/v1/datasets", headers=api.h(), files={"file": ("e.npz", evil.getvalue())})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM


def test_job_submission_queues_only_the_id(api: ApiHarness, tiny_onnx: Path, redis_url: str) -> None:
    r_redis = redis.Redis.from_url(redis_url)
    before = r_redis.llen("gpu")
    model = upload(api, tiny_onnx).json()
    r = api.client.post("/v1/jobs", headers=api.h(), json=job_body(model["id"]))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0 and job["spec"]["steps"] == 5
    assert r_redis.llen("gpu") == before + 1
    msg = r_redis.lindex("gpu", 0)
    assert msg is not None and job["id"].encode() in msg and b"hwprune.prune" in msg
    assert b"tiny" not in msg and str(model["size_bytes"]).encode() not in msg


@pytest.mark.parametrize(("patch", "needle"), [
    ({"target_sparsity": 1.5}, "target_sparsity"),
    ({"method": "lottery"}, "method"),
    ({"accelerator": "tpu-v9"}, "tpu-v9"),
    ({"granularity": "block", "accelerator": "cpu"}, "block"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"method": "3d", "target_sparsity": None}, "flops_target"),
    ({"min_keep": "lots"}, "invalid job parameters"),
])
def test_invalid_job_requests_are_problem_422(api: ApiHarness, tiny_onnx: Path, patch: dict[str, object],
                                              needle: str) -> None:
    model = upload(api, tiny_onnx).json()
    body = {k: v for k, v in {**job_body(model["id"]), **patch}.items() if v is not None}
    r = api.client.post("/v1/jobs", headers=api.h(), json=body)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, r.text
    p = r.json()
    assert p["status"] == 422 and p["title"] and needle in p["detail"], p


def test_lists_paginate_and_filter(api: ApiHarness, tiny_onnx: Path) -> None:
    model = upload(api, tiny_onnx).json()
    ids = [api.client.post("/v1/jobs", headers=api.h(), json=job_body(model["id"], seed=i)).json()["id"]
           for i in range(5)]
    api.client.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.h())
    seen, cursor = [], None
    while True:
        params: dict[str, object] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/v1/jobs", headers=api.h(), params=params).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1], "pages must cover every job once, newest first"
    q = api.client.get("/v1/jobs", headers=api.h(), params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in q] == [ids[0]]
    q = api.client.get("/v1/jobs", headers=api.h(), params={"model_id": model["id"], "method": "magnitude"})
    assert len(q.json()["items"]) == 5
    assert api.client.get("/v1/jobs", headers=api.h(), params={"method": "smart"}).json()["items"] == []
    bad = api.client.get("/v1/jobs", headers=api.h(), params={"status": "done"})
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
    assert api.client.get("/v1/jobs", headers=api.h(), params={"cursor": "../etc"}).status_code == 422
    assert api.client.get("/v1/jobs", headers=api.h(), params={"limit": 0}).status_code == 422


def test_tenants_cannot_see_each_other(api: ApiHarness, tiny_onnx: Path) -> None:
    model = upload(api, tiny_onnx).json()
    job = api.client.post("/v1/jobs", headers=api.h(), json=job_body(model["id"])).json()
    b = api.h(api.key_b)
    for path in (f"/v1/models/{model['id']}", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events",
                 f"/v1/jobs/{job['id']}/artifacts/model.onnx", f"/v1/jobs/{job['id']}/artifacts/report.json"):
        r = api.client.get(path, headers=b)
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, path
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=b).status_code == 404
    # Tenant B cannot start a job on A's model either.
    assert api.client.post("/v1/jobs", headers=b, json=job_body(model["id"])).status_code == 404
    assert api.client.get("/v1/models", headers=b).json()["items"] == []
    assert api.client.get("/v1/jobs", headers=b).json()["items"] == []
    # ...and A's job is untouched by B's attempts.
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.h()).json()["status"] == "queued"


def test_cancel_queued_then_conflict(api: ApiHarness, tiny_onnx: Path) -> None:
    model = upload(api, tiny_onnx).json()
    job = api.client.post("/v1/jobs", headers=api.h(), json=job_body(model["id"])).json()
    art = api.client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=api.h())
    assert art.status_code == 409 and "queued" in art.json()["detail"]
    r = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h())
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.h())
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert api.client.get(f"/v1/jobs/{job['id']}/artifacts/secrets.txt", headers=api.h()).status_code == 404


def test_accelerators_match_the_builtin_profiles(api: ApiHarness) -> None:
    from pruning_core.accelerators import BUILTIN_PROFILES

    got = {p["name"]: p for p in api.client.get("/v1/accelerators", headers=api.h()).json()}
    assert set(got) == set(BUILTIN_PROFILES)
    assert got["npu-4x4"]["block_shape"] == [4, 4] and got["gpu-2of4"]["nm"] == [2, 4]


def test_torchscript_needs_an_input_shape(api: ApiHarness, tmp_path: Path) -> None:
    import torch
    from torch import nn

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten()).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.trace(m, torch.randn(1, 3, 8, 8)).save(str(path))
    r = upload(api, path)
    assert r.status_code == 422 and "input_shape" in r.json()["detail"], r.text
    r = upload(api, path, input_shape="1,3,8,8")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == "torchscript" and body["input_shape"] == [1, 3, 8, 8]
    assert body["macs"] == 6 * 6 * 8 * 3 * 9  # one 3x3 conv, 8 out channels, 6x6 output
    bad = upload(api, path, input_shape="1,3,x")
    assert bad.status_code == 422 and "input_shape" in bad.json()["detail"]
