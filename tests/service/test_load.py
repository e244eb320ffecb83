"""Load (issue 7), CI-sized: 50 small jobs at once to 2 Celery workers -- all terminal, none lost, none run twice.
The full 200-job run is `python bench/reliability_load.py --jobs 200 --workers 2` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from bench.reliability_load import main


@pytest.mark.services
@pytest.mark.slow
def test_fifty_jobs_two_workers_none_lost_none_twice() -> None:
    got = main(["--jobs", "50", "--workers", "2", "--timeout", "600"])
    assert got["submitted"] == got["rows"] == 50
    assert got["statuses"] == {"succeeded": 50}, got
    assert got["lost"] == 0 and got["twice"] == 0 and got["attempts"] == {1: 50}, got
    per_worker = got["per_worker"]
    assert isinstance(per_worker, list) and sum(per_worker) == 50 and min(per_worker) > 0, \
        "both workers took jobs, and each job was pruned exactly once across them"
