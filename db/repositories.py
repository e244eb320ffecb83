"""Tenant-scoped reads. Every query here takes `tenant_id`; a row of another tenant is simply not found,
so the API answers 404 for it, exactly as for an id that does not exist."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import Connection, Row, Select, bindparam, select
from sqlalchemy.orm import Session

from db.ids import is_id
from db.models import DatasetRecord, Job, ModelRecord

T = TypeVar("T", ModelRecord, DatasetRecord, Job)


def get_owned(session: Session, cls: type[T], tenant_id: str, row_id: str) -> T | None:
    if not is_id(row_id):
        return None
    return session.scalar(select(cls).where(cls.id == row_id, cls.tenant_id == tenant_id))


@cache
def _owned_stmt(cls: type[Any]) -> Select[Any]:
    table = cls.__table__
    return select(table).where(table.c.id == bindparam("row_id"), table.c.tenant_id == bindparam("tenant_id"))


def read_owned(conn: Connection, cls: type[T], tenant_id: str, row_id: str) -> Row[Any] | None:
    """`get_owned` for hot read-only paths: a Core row (attributes named like the model's) instead of an ORM
    object, so no Session, identity map or unit of work is set up for a single SELECT. The statement is built
    once per table (building and cache-keying it again per call cost more CPU than the query itself)."""
    if not is_id(row_id):
        return None
    return conn.execute(_owned_stmt(cls), {"row_id": row_id, "tenant_id": tenant_id}).first()


def page(
    session: Session, cls: type[T], tenant_id: str, limit: int, cursor: str | None, **filters: Any
) -> tuple[Sequence[T], str | None]:
    """Newest first. `cursor` is the last id of the previous page (ids are time-ordered, see db/ids.py).
    Returns the rows and the cursor of the next page (None at the end)."""
    assert limit >= 1, "limit must be positive"
    stmt: Select[T] = select(cls).where(cls.tenant_id == tenant_id)
    for col, value in filters.items():
        if value is not None:
            stmt = stmt.where(getattr(cls, col) == value)
    if cursor is not None:
        stmt = stmt.where(cls.id < cursor)
    rows = session.scalars(stmt.order_by(cls.id.desc()).limit(limit + 1)).all()
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None
