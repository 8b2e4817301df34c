"""Telling a local dnbd3-server to rescan its store: SIGHUP to the pid in its pid file.

Not SIGUSR1: since 2024 that starts a full CRC pass and does not rescan (docs/dnbd3-store.md). The pid
file is checked before an export starts, so that a missing file or a dead server fails the export before
the revision becomes visible.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from stage4.errors import InputError, Stage4Error


def server_pid(pidfile: Path) -> int:
    """The pid of a running process that we may signal, read from `pidfile`; else a one-line error."""
    try:
        text = Path(pidfile).read_text().strip()
    except OSError as exc:
        raise InputError(f"pid file {pidfile}: {exc.strerror or exc}") from None
    if not text.isdigit() or int(text) < 1:
        raise InputError(f"pid file {pidfile}: {text[:40]!r} is not a process id")
    pid = int(text)
    _signal(pid, 0, pidfile)
    return pid


def reload_server(pidfile: Path) -> int:
    """Send SIGHUP (rescan the image directory) to the server whose pid is in `pidfile`."""
    pid = server_pid(pidfile)
    _signal(pid, signal.SIGHUP, pidfile)
    return pid


def _signal(pid: int, signum: int, pidfile: Path) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise Stage4Error(f"server reload: no process {pid} (from {pidfile})") from None
    except PermissionError:
        raise Stage4Error(f"server reload: not allowed to signal process {pid} (from {pidfile})") from None
