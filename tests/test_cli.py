"""The CLI contract of DESIGN.md, run as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnxruntime as ort

from tests.conftest import DigitsModel


def _hwprune(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["hwprune", *map(str, args)], capture_output=True, text=True, timeout=600)


def test_prune_writes_model_and_report(digits_model: DigitsModel, tmp_path: Path) -> None:
    out, rep = tmp_path / "pruned.onnx", tmp_path / "r.json"
    res = _hwprune("prune", digits_model.onnx_path, "--out", out, "--report", rep, "--method", "magnitude",
                   "--block", "1x4", "--sparsity", "0.5", "--data", digits_model.data_path, "--steps", "20",
                   "--seed", "1", "--threads", "1")
    assert res.returncode == 0, res.stderr
    report = json.loads(rep.read_text())
    assert report["accelerator"]["block_shape"] == [1, 4] and report["spec"]["seed"] == 1
    assert "speedup" in res.stdout and "%" in res.stderr  # summary on stdout, progress bar on stderr
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_bench_prints_latency(digits_model: DigitsModel) -> None:
    res = _hwprune("bench", digits_model.onnx_path, "--json", "--max-seconds", "1")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["input_shape"] == [1, 1, 8, 8] and stats["median"] > 0 and stats["runs"] > 0


def test_errors_are_messages_not_tracebacks(digits_model: DigitsModel, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    for args in (
        ("prune", junk, "--out", tmp_path / "o.onnx"),
        ("prune", digits_model.onnx_path, "--out", tmp_path / "o.onnx", "--nm", "4:2"),
        ("prune", digits_model.onnx_path, "--out", tmp_path / "o.onnx", "--sparsity", "1.5"),
        ("prune", digits_model.torchscript_path, "--out", tmp_path / "o.onnx"),  # TorchScript needs --input-shape
        ("bench", digits_model.onnx_path, "--input-shape", "1,x,8"),
    ):
        res = _hwprune(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr
