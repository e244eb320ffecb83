"""Recognise an upload by its bytes, never by its file name.

ONNX is a protobuf `ModelProto`; TorchScript is a zip archive whose members include `code/` (the
serialized TorchScript source) and `data.pkl`. A plain `torch.save` checkpoint is also a zip with
`data.pkl` but no `code/`: we refuse it *before* anything unpickles it, because loading it would run
arbitrary pickled objects.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from pruning_core.errors import ModelRejected

ZIP_MAGIC = b"PK\x03\x04"
# A TorchScript archive whose members claim more than this when uncompressed is refused (zip bombs).
MAX_ZIP_UNCOMPRESSED_BYTES = 8 * 1024**3

NOT_A_MODEL = (
    "not an ONNX or TorchScript model: upload a .onnx file (torch.onnx.export) or a TorchScript archive "
    "saved with torch.jit.trace(...).save() / torch.jit.script(...).save()"
)


def _torchscript_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelRejected(f"{NOT_A_MODEL} (broken zip archive: {exc})") from exc
    total = sum(info.file_size for info in infos)
    if total > MAX_ZIP_UNCOMPRESSED_BYTES:
        raise ModelRejected(f"archive expands to {total} bytes, more than the {MAX_ZIP_UNCOMPRESSED_BYTES} allowed")
    return [info.filename for info in infos]


def is_torchscript_zip(path: Path) -> bool:
    """True for a TorchScript archive; False for any other zip (e.g. a torch.save checkpoint)."""
    names = _torchscript_members(path)
    has_code = any("/code/" in f"/{name}" for name in names)
    has_data = any(name.endswith("data.pkl") for name in names)
    return has_code and has_data


def load_onnx_proto(path: Path) -> onnx.ModelProto:
    """Parse ONNX without touching external data (that is checked separately in `safety.py`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelRejected(f"{NOT_A_MODEL} (protobuf parse failed: {exc})") from exc
    # Arbitrary bytes sometimes parse as an (almost) empty protobuf: demand a real graph.
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise ModelRejected(NOT_A_MODEL)
    return model


def detect_format(path: Path) -> str:
    """Return "onnx" or "torchscript" from the file's content; `ModelRejected` otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise ModelRejected(f"cannot read the model file: {exc}") from exc
    if head == ZIP_MAGIC:
        if is_torchscript_zip(path):
            return "torchscript"
        raise ModelRejected(
            "this zip archive is not TorchScript (it has no code/ folder; a torch.save checkpoint or state_dict "
            "is refused because loading it would unpickle arbitrary objects): save the model with "
            "torch.jit.trace(model, example).save(path) or torch.jit.script(model).save(path), or export ONNX"
        )
    load_onnx_proto(path)
    return "onnx"
