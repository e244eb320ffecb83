"""Streaming multipart uploads: the file part goes to disk chunk by chunk, hashed on the way, and the size
limit is enforced while the bytes arrive (the request is cut off as soon as it is exceeded).

FastAPI's `UploadFile` would parse the whole body first (spooling it to a temp file) and only then let us
look at its size; for multi-GB models we want to refuse early and never hold more than one chunk in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session, sessionmaker

from db.artifacts import ArtifactStore

R = TypeVar("R")

MAX_FIELD_BYTES = 64 * 1024  # non-file form fields (name, input_shape) are short
MAX_FIELDS = 16
MULTIPART_OVERHEAD = 64 * 1024  # boundaries + small fields on top of the file itself


class UploadRejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class ReceivedUpload:
    path: Path | None = None  # where the file part landed (None if the request had no `file` part)
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    def __init__(self, file_field: str, dest: Path, limit: int) -> None:
        self.file_field, self.dest, self.limit = file_field, dest, limit
        self.out = ReceivedUpload()
        self._hash = hashlib.sha256()
        self._fh: IO[bytes] | None = None
        self._hname = b""
        self._hvalue = b""
        self._disposition = b""
        self._part_name: str | None = None
        self._is_file = False
        self._buf = bytearray()

    # python-multipart callbacks ------------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition, self._part_name, self._is_file = b"", None, False
        self._buf = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._disposition)
        if b"name" not in opts:
            raise UploadRejected(400, 'every multipart part needs Content-Disposition with a "name"')
        self._part_name = opts[b"name"].decode("utf-8", "replace")
        self._is_file = b"filename" in opts
        if self._is_file:
            if self._part_name != self.file_field:
                raise UploadRejected(422, f"unexpected file part {self._part_name!r}; send the file as "
                                          f"{self.file_field!r}")
            if self._fh is not None:
                raise UploadRejected(422, f"send exactly one {self.file_field!r} part")
            self.out.filename = opts[b"filename"].decode("utf-8", "replace")
            self.out.path = self.dest
            self._fh = open(self.dest, "wb")  # noqa: SIM115 (closed in on_part_end / close())
        elif len(self.out.fields) >= MAX_FIELDS:
            raise UploadRejected(422, f"too many form fields (at most {MAX_FIELDS})")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            assert self._fh is not None, "file part without an open file"
            self.out.size += len(chunk)
            if self.out.size > self.limit:
                raise UploadRejected(413, f"file is larger than the limit of {self.limit} bytes "
                                          "(HWPRUNE_MAX_UPLOAD_BYTES / HWPRUNE_MAX_DATASET_BYTES)")
            self._hash.update(chunk)
            self._fh.write(chunk)
        else:
            self._buf.extend(chunk)
            if len(self._buf) > MAX_FIELD_BYTES:
                raise UploadRejected(413, f"form field {self._part_name!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._is_file:
            self.close()
        elif self._part_name is not None:
            self.out.fields[self._part_name] = self._buf.decode("utf-8", "replace")

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


async def receive_upload(
    content_type: str | None, stream: AsyncIterator[bytes], *, file_field: str, dest: Path, limit: int
) -> ReceivedUpload:
    """Parse a multipart body from `stream`; the `file_field` part is written to `dest` (removed on error)."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadRejected(415, f"send multipart/form-data with the model in a {file_field!r} part")
    rx = _Receiver(file_field, dest, limit)
    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": rx.on_part_begin, "on_part_data": rx.on_part_data, "on_part_end": rx.on_part_end,
        "on_header_field": rx.on_header_field, "on_header_value": rx.on_header_value,
        "on_header_end": rx.on_header_end, "on_headers_finished": rx.on_headers_finished,
    })
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except UploadRejected:
        rx.close()
        dest.unlink(missing_ok=True)
        raise
    except Exception as e:  # malformed multipart, client went away
        rx.close()
        dest.unlink(missing_ok=True)
        raise UploadRejected(400, f"could not read the multipart body: {e}") from e
    rx.close()
    if rx.out.path is None:
        raise UploadRejected(422, f"missing the {file_field!r} file part")
    rx.out.sha256 = rx._hash.hexdigest()
    return rx.out


def commit_upload_row(factory: sessionmaker[Session], store: ArtifactStore, tmp: Path, dest: Path, row: R) -> R:
    """Move a validated upload to its id-derived home, then insert its row (file first: a row never points
    at a missing file)."""
    store.commit_upload(tmp, dest)
    with factory() as session, session.begin():
        session.add(row)
    return row
