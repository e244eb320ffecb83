"""Service tests: API, database + migrations, Celery and embedded workers, against real PostgreSQL/Redis."""
