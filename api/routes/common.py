"""Pieces shared by the routes: upload handling, pagination parameters, 404s that do not leak ownership."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Query, Request
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from db.ids import is_id

T = TypeVar("T")

LimitQ = Annotated[int, Query(ge=1, le=200, description="page size")]
CursorQ = Annotated[str | None, Query(description="`next_cursor` of the previous page")]

MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "name": {"type": "string"},
            "input_shape": {"type": "string", "example": "1,3,224,224",
                            "description": "required for TorchScript models"},
        }}}},
    }
}


def check_cursor(cursor: str | None) -> str | None:
    if cursor is not None and not is_id(cursor):
        raise Problem(422, "cursor must be the `next_cursor` value of a previous page")
    return cursor


def not_found(kind: str, row_id: str) -> Problem:
    return Problem(404, f"{kind} {row_id!r} not found (ids are per tenant: use one returned to your key)")


def too_large_early(request: Request, limit: int) -> None:
    """Refuse before reading a byte when Content-Length already says the file cannot fit."""
    from api.uploads import MULTIPART_OVERHEAD

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
        raise Problem(413, f"upload of {length} bytes exceeds the limit of {limit} bytes", {"Connection": "close"})


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await run_in_threadpool(fn, *args)


__all__ = ["CursorQ", "LimitQ", "check_cursor", "in_thread", "not_found", "too_large_early"]
