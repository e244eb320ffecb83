"""Alembic entry points used by `hwprune db upgrade`, the embedded default and the tests.

The Alembic folder ships inside the installed `migrations` package, so this works from a wheel as well as
from a checkout; the database URL is passed in, never read from alembic.ini.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine


def alembic_config(database_url: str) -> Config:
    import migrations

    # __path__ rather than importlib.resources: it also works when an old editable install maps the folder
    # as a namespace package.
    root = Path(next(p for p in migrations.__path__ if Path(p).is_dir()))
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(database_url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the models and the live schema (empty when migrations and models agree)."""
    from alembic.autogenerate import compare_metadata

    from db.models import Base

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(ctx, Base.metadata))
