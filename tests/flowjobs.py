"""Job functions for the tests of posting dependencies (module
``flowjobs``): a map step that stores its results and a fan-in step that
reads them through the job context."""

from __future__ import annotations

from typing import Any

from pdoflowd import current_job
from pdoflowd.client import job


@job(store_result=True)
def square(x: int) -> int:
    return x * x


@job(store_result=True)
def total() -> dict[str, Any]:
    """Sum what every upstream posting returned, posting by posting."""
    found = current_job().upstream_results()
    return {str(posting): sum(values) for posting, values in found.items()}


@job()
def read_upstreams() -> None:
    """Fails when an upstream posting does not store results."""
    current_job().upstream_results()
