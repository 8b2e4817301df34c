"""Timing the parts of a step for its manifest (`timings_seconds`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[key] = round(time.monotonic() - start, 1)
