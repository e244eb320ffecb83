"""Service commands: `serve`, `worker`, `keys create`, `db upgrade`.

`serve` without a broker is the embedded default: it upgrades its own SQLite file (a fresh machine has no
separate migrate step, and nobody else shares that file), starts an in-process worker and prints the URL and,
on first start, an API key. With a broker it runs the API only; the schema of a shared PostgreSQL database is
only ever changed by an explicit `hwprune db upgrade` (compose runs it as a one-shot service).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from sqlalchemy import select

from hwprune.settings import Settings, get_settings

keys_app = typer.Typer(no_args_is_help=True, help="API keys (one tenant each).")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")


def _ensure_schema(settings: Settings) -> None:
    """SQLite (embedded): migrate in place. PostgreSQL: refuse to run on a schema that is not at head."""
    from db.migrate import current_revision, head_revision, upgrade
    from db.session import make_engine

    url = settings.resolved_database_url
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(url)
        return
    engine = make_engine(url)
    try:
        cur, head = current_revision(engine), head_revision(url)
    finally:
        engine.dispose()
    if cur != head:
        typer.echo(f"database schema is at {cur or 'nothing'}, code needs {head}: run `hwprune db upgrade`", err=True)
        raise typer.Exit(2)


def _first_key(settings: Settings) -> str | None:
    """A key for tenant `default` when the database has no key at all (first start), else None."""
    from db.keys import create_key
    from db.models import ApiKey
    from db.session import make_engine, make_session_factory, transaction

    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            if s.scalar(select(ApiKey.id).limit(1)) is not None:
                return None
            return create_key(s, "default")[1]
    finally:
        engine.dispose()


def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    workers: Annotated[int | None, typer.Option(min=1, help="API processes (default HWPRUNE_API_WORKERS = 1); "
                                                        "more than 1 needs HWPRUNE_BROKER_URL")] = None,
) -> None:
    """Run the HTTP API (and, without HWPRUNE_BROKER_URL, a worker in the same process)."""
    import uvicorn

    from api.app import create_app
    from api.gc_tuning import freeze_startup_objects

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = get_settings()
    n = workers or settings.api_workers
    if n > 1 and settings.embedded:
        typer.echo("--workers > 1 needs HWPRUNE_BROKER_URL: the embedded worker runs inside the one API process",
                   err=True)
        raise typer.Exit(2)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_schema(settings)
    if n > 1:
        _serve_processes(settings, host, port, log_level, n)
        return
    dispatcher = None
    if settings.embedded:
        from worker.embedded import EmbeddedWorker

        dispatcher = EmbeddedWorker(settings)
    app = create_app(settings, dispatcher)
    mode = "embedded worker" if settings.embedded else f"jobs go to {settings.broker_url}"
    typer.echo(f"hwprune API on http://{host}:{port}  (docs: http://{host}:{port}/docs; {mode}; "
               f"data in {settings.data_dir.resolve()})")
    key = _first_key(settings) if settings.embedded else None  # scaled: `hwprune keys create`, not logs
    if key:
        typer.echo("first API key (tenant 'default'; shown once, store it now):")
        typer.echo(key)
    freeze_startup_objects()
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _serve_processes(settings: Settings, host: str, port: int, log_level: str, n: int) -> None:
    """uvicorn's multi-process mode: n processes built by `api.app:create_worker_app` share the socket; this
    supervising process runs the one sweeper of this `serve` (none of the n does)."""
    import uvicorn

    from api.app import start_sweeper
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url, pool_size=2, max_overflow=2)
    sweeper = start_sweeper(settings, make_session_factory(engine))
    typer.echo(f"hwprune API on http://{host}:{port}  (docs: http://{host}:{port}/docs; {n} processes; jobs go to "
               f"{settings.broker_url}; data in {settings.data_dir.resolve()})")
    try:
        uvicorn.run("api.app:create_worker_app", factory=True, workers=n, host=host, port=port, log_level=log_level)
    finally:
        if sweeper is not None:
            sweeper.stop()
        engine.dispose()


def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: gpu (pruning), cpu (latency measurement)")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option(help="parallel jobs in this worker")] = 1,
    log_level: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    name: Annotated[str | None, typer.Option(help="Celery node name (default hwprune-<queues>@host)")] = None,
) -> None:
    """Run a Celery worker consuming the given queues (needs HWPRUNE_BROKER_URL)."""
    settings = get_settings()
    if settings.embedded:
        typer.echo("HWPRUNE_BROKER_URL is not set: `hwprune serve` runs jobs itself without a worker", err=True)
        raise typer.Exit(2)
    qs = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = set(qs) - {"gpu", "cpu"}
    if not qs or unknown:
        typer.echo(f"--queues takes gpu and/or cpu, got {queues!r}", err=True)
        raise typer.Exit(2)
    _ensure_schema(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import worker.tasks  # noqa: F401  (registers the tasks)
    from worker.celery_app import celery_app

    celery_app.worker_main([
        "worker", "-Q", ",".join(qs), "-c", str(concurrency), "-l", log_level,
        "-n", name or f"hwprune-{'-'.join(qs)}@%h", "--without-gossip", "--without-mingle",
    ])


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="tenant the key belongs to (created if new)")]) -> None:
    """Create an API key; the key is printed alone on the last line."""
    from db.keys import create_key
    from db.session import make_engine, make_session_factory, transaction

    settings = get_settings()
    _ensure_schema(settings)
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as s:
            t, key = create_key(s, tenant)
            tenant_id = t.id
    finally:
        engine.dispose()
    typer.echo(f"created a key for tenant {tenant!r} ({tenant_id}); it is shown only once:")
    typer.echo(key)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply Alembic migrations to HWPRUNE_DATABASE_URL (the only way the schema is made)."""
    from db.migrate import upgrade

    settings = get_settings()
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}")


def register(app: typer.Typer) -> None:
    """Attach the service commands to the main app."""
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(keys_app, name="keys")
    app.add_typer(db_app, name="db")
