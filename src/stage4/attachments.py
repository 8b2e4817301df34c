"""What a build attached, recorded as it happens: processes, loop devices and mount points.

A build appends one JSON object a line to `.stage4-records.jsonl` in the directory it works in: the
processes it starts (PID and start time), loop devices and mount points, between an `open` and a
`closed` line of its owner (`scope`). The runner records as it runs commands; workdirs.py reads the
records back to release what a killed build left. An owner is one process, told apart from a later
process with the same PID by its start time and the boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

RECORDS = ".stage4-records.jsonl"
# One line of the records, as read back: JSON whose fields depend on its "what" (never trusted to be typed).
Record = dict[str, object]


class OwnerRecord(TypedDict):
    pid: int
    start: int
    boot: str


@dataclass(frozen=True)
class Owner:
    """One process, told apart from a later process with the same PID by its start time and the boot."""

    pid: int
    start: int
    boot: str

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), process_start(os.getpid()) or 0, boot_id())

    @classmethod
    def of(cls, pid: int) -> Owner | None:
        start = process_start(pid)
        return None if start is None else cls(pid, start, boot_id())

    @classmethod
    def from_record(cls, data: object) -> Owner | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["pid"]), int(data["start"]), str(data["boot"]))
        except (TypeError, KeyError, ValueError):
            return None

    def alive(self) -> bool:
        return self.start is not None and self.boot == boot_id() and process_start(self.pid) == self.start

    def to_record(self) -> OwnerRecord:
        return {"pid": self.pid, "start": self.start, "boot": self.boot}


def process_start(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), None if there is none or it is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


# --- recording -------------------------------------------------------------------------------------------


def note(directory: Path, what: str, **facts: object) -> None:
    """Append one record to `directory`'s records, flushed before the caller goes on."""
    directory.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"owner": Owner.me().to_record(), "what": what, **facts}) + "\n"
    with (directory / RECORDS).open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def scope(directory: Path) -> Iterator[None]:
    """Records made in `directory` while the context lasts belong to an open scope of this process;
    the scope is closed on every orderly exit (the attachments are released by then)."""
    note(directory, "open")
    try:
        yield
    finally:
        note(directory, "closed")


def note_process(directory: Path, pid: int, argv: list[str]) -> None:
    note(directory, "process", pid=pid, start=process_start(pid), argv=argv[:6])


# --- reading records ---------------------------------------------------------------------------------------


def read_records(work: Path) -> list[Record]:
    """The records in `work` and its subdirectories (never below a mount point)."""
    found: list[Record] = []
    for directory in _record_dirs(work):
        with contextlib.suppress(OSError):
            for line in (directory / RECORDS).read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        found.append(record)
    return found


def _record_dirs(work: Path, depth: int = 3) -> Iterator[Path]:
    # Records are at most two levels down (<work>/<layer>/attach); a chroot's tree is never walked.
    if (work / RECORDS).is_file():
        yield work
    if depth == 0:
        return
    with contextlib.suppress(OSError):
        for child in work.iterdir():
            with contextlib.suppress(OSError):
                if child.is_dir() and not child.is_symlink() and not os.path.ismount(child):
                    yield from _record_dirs(child, depth - 1)


def open_scopes(records: list[Record]) -> list[Owner]:
    """Owners with a scope in these records that they never closed: still attached, or killed while so."""
    balance: dict[Owner, int] = {}
    for record in records:
        owner = Owner.from_record(record.get("owner"))
        if owner is not None and record.get("what") in ("open", "closed"):
            balance[owner] = balance.get(owner, 0) + (1 if record["what"] == "open" else -1)
    return [owner for owner, opened in balance.items() if opened > 0]
