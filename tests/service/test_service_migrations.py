"""Alembic is the only way the schema is made: from empty on PostgreSQL and SQLite, and it agrees with the
models (autogenerate's compare_metadata finds nothing to change)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect

from db.migrate import alembic_config, current_revision, head_revision, schema_diff, upgrade
from db.models import Base
from db.session import make_engine

TABLES = {"tenants", "api_keys", "models", "datasets", "jobs"}


def _check_from_empty(url: str) -> None:
    engine = make_engine(url)
    try:
        assert not set(inspect(engine).get_table_names()) & TABLES, "database was not empty"
        assert current_revision(engine) is None
        upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
        assert current_revision(engine) == head_revision(url)
        assert schema_diff(engine) == [], "models and migrations disagree: write a migration"
        # Down to nothing and back up: downgrades work and leave no table behind.
        command.downgrade(alembic_config(url), "base")
        assert not set(inspect(engine).get_table_names()) & TABLES
        upgrade(url)
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


@pytest.mark.services
def test_postgres_from_empty(empty_pg_url: str) -> None:
    _check_from_empty(empty_pg_url)


def test_sqlite_from_empty(tmp_path: Path) -> None:
    _check_from_empty(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_diff_detects_a_model_change(tmp_path: Path) -> None:
    """The agreement check is not vacuous: a column missing from the migrations shows up as a diff."""
    from sqlalchemy import Column, Integer, Table

    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    extra = Table("not_migrated", Base.metadata, Column("id", Integer, primary_key=True))
    try:
        diff = schema_diff(make_engine(url))
        assert any(d[0] == "add_table" and d[1].name == "not_migrated" for d in diff), diff
    finally:
        Base.metadata.remove(extra)
