"""What the benchmark scripts share: timing a step and printing it as it ends; the stage4 command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def timed(label: str, fn):
    """(fn's result, seconds it took); prints the label and the time."""
    start = time.monotonic()
    result = fn()
    seconds = time.monotonic() - start
    print(f"  {label}: {seconds:.1f} s", flush=True)
    return result, seconds


def stage4(project: Path, *args: object) -> str:
    """`stage4 -c PROJECT ARGS...` (this Python's); its output, or the run ends with its last error line."""
    result = subprocess.run(
        [sys.executable, "-m", "stage4", "-c", str(project), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"stage4 {args[0]} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout
