"""Ends the process groups stage4 started when stage4 ends without stopping them (SIGKILL, the OOM killer).

The Runner starts this once per stage4 process (`python -m stage4.guardian`, in its own session) with a
pipe as stdin and writes `+PGID` when it starts a command and `-PGID` when the command is over. The pipe
closes when stage4 exits, however it exits; the groups still listed then get SIGTERM, and SIGKILL after a
grace period: no Ansible or apt in a chroot, no mmdebstrap and no qemu outlives the build that ran it.
PR_SET_PDEATHSIG (runner.py) only reaches the command itself, not the processes it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

GRACE_SECONDS = 10


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is stage4's to handle; EOF is the signal here
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in "+-" and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
    groups = {group for group in groups if _alive(group)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        deadline = time.monotonic() + GRACE_SECONDS
        while sig == signal.SIGTERM and any(_alive(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
