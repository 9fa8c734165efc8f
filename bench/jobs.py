"""Job functions the benchmark posts; workers import them as ``bench.jobs``.

Kept free of other imports so that running one costs only the call.
"""

import time

from pdoflowd import job


@job()
def noop(*args: object, **kwargs: object) -> None:
    """Do nothing: what is measured is the queue's own cost per job."""


@job()
def nap(seconds: float) -> None:
    """Sleep, standing for a job of known length."""
    time.sleep(seconds)
