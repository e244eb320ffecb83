"""Cheap validation of uploads, run in a separate process.

Parsing an ONNX protobuf holds the whole model in memory several times over (bench: ~6x the file size for
`inspect_model`), and a parser fed hostile bytes may crash. Doing it in a small pool of spawned processes keeps
the API process' memory independent of upload size and lets a crash cost one 422 instead of the server.
Processes are recycled every `TASKS_PER_CHILD` inspections so the memory of a huge model is returned.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pruning_core.errors import DatasetRejected, ModelRejected

log = logging.getLogger("hwprune.api")
WORKERS = 2  # concurrent inspections
TASKS_PER_CHILD = 8

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def _model_info(path: str, input_shape: list[int] | None) -> dict[str, Any]:
    """Runs in the child. Errors come back as values: some HwpruneError subclasses do not pickle."""
    from pathlib import Path

    from pruning_core.errors import HwpruneError
    from pruning_core.ingest import inspect_model

    try:
        return {"ok": inspect_model(Path(path), input_shape=input_shape).to_dict()}
    except HwpruneError as e:
        return {"rejected": str(e)}
    except Exception as e:  # a parser failing on arbitrary bytes is still "not a model"
        return {"rejected": f"not a valid ONNX or TorchScript model: {type(e).__name__}: {e}"}


def _dataset_info(path: str) -> dict[str, Any]:
    from pathlib import Path

    from pruning_core.data import inspect_dataset
    from pruning_core.errors import HwpruneError

    try:
        return {"ok": inspect_dataset(Path(path)).to_dict()}
    except HwpruneError as e:
        return {"rejected": str(e)}
    except Exception as e:
        return {"rejected": f"not a readable .npz with an 'inputs' array: {type(e).__name__}: {e}"}


def _exit_with_parent(parent_pid: int) -> None:
    """Runs in each inspection process: exit when the API process is gone. A hard-killed API (SIGKILL, OOM
    killer) never shuts its pool down, and the idle workers would otherwise live on, ~750 MB each."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                        max_tasks_per_child=TASKS_PER_CHILD, initializer=_exit_with_parent,
                                        initargs=(os.getpid(),))
        return _pool


def _reset_pool() -> None:
    global _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)


async def _run(fn: Any, *args: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    try:
        result: dict[str, Any] = await loop.run_in_executor(_get_pool(), fn, *args)
    except BrokenProcessPool:
        log.warning("an inspection process died; restarting the pool")
        _reset_pool()
        return {"rejected": "the file crashed the model parser; it is not a model we can read"}
    return result


async def inspect_model_file(path: str, input_shape: list[int] | None) -> dict[str, Any]:
    res = await _run(_model_info, path, input_shape)
    if "rejected" in res:
        raise ModelRejected(res["rejected"])
    info: dict[str, Any] = res["ok"]
    return info


async def inspect_dataset_file(path: str) -> dict[str, Any]:
    res = await _run(_dataset_info, path)
    if "rejected" in res:
        raise DatasetRejected(res["rejected"])
    info: dict[str, Any] = res["ok"]
    return info
