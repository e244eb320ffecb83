"""Alembic migrations: the only way the hwprune schema is made (`hwprune db upgrade`, see db/migrate.py)."""
