"""hwprune's pruning library: ingestion, accelerator-shaped pruning, fine-tuning, export, measurement.

A plain library: it never imports FastAPI, SQLAlchemy or Celery. The CLI, the worker and the
benchmarks all call it.
"""
