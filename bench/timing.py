"""What the benchmark scripts share: timing a step and printing it as it ends."""

from __future__ import annotations

import time


def timed(label: str, fn):
    """(fn's result, seconds it took); prints the label and the time."""
    start = time.monotonic()
    result = fn()
    seconds = time.monotonic() - start
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return result, seconds
