"""A worker pool process imports everything a job needs before it takes one (worker/tasks.py `_preload`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAZY = ["onnx", "onnx2torch", "onnxruntime", "onnxslim", "torch_pruning", "torchvision"]


def test_warm_imports_load_what_jobs_would_load_lazily() -> None:
    # a fresh interpreter: this test process has imported most of these already
    code = (
        "import json, sys, pruning_core.pipeline as p\n"
        f"lazy = {LAZY!r}\n"
        "before = [m for m in lazy if m in sys.modules]\n"
        "p.warm_imports()\n"
        "print(json.dumps([before, [m for m in lazy if m in sys.modules]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == [], f"importing the pipeline alone already loads {before}: the test no longer tells"
    assert after == LAZY


def test_pool_process_start_warms_the_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import pruning_core.pipeline
    import worker.tasks

    calls: list[str] = []
    monkeypatch.setattr(pruning_core.pipeline, "warm_imports", lambda: calls.append("warm"))
    monkeypatch.setattr(worker.tasks, "_context", lambda: calls.append("context"))
    worker.tasks._preload()
    assert calls == ["warm", "context"]
