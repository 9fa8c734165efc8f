"""Progress lines on stderr while the benchmark runs.

Owns only how a step is announced and timed on the terminal; the table
and the JSON are what count.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timed(what: str, action: Callable[[], T], show: Callable[[T], str]) -> T:
    started = time.monotonic()
    result = action()
    took = time.monotonic() - started
    say(f"    {what}: {show(result)} ({took:.1f} s)")
    return result
