"""The revisions of a name in a local store: which are complete, which a crash left incomplete, pruning.

A revision is complete when its image `.r<RID>`, its `.crc`, its record and every boot-directory file the
record names (kernel, initrd, config fragment, iPXE entry) exist. An export links the record first and the
image last, so a crashed export leaves an incomplete revision whose record (in the name's own `.stage4/`
directory) still says where its boot files are; `check` reports those and `repair` withdraws them.
The revision `<boot-dir>/config` points clients at is active and never pruned, nor is the one whose kernel
and initramfs the active entry `<boot-dir>/ipxe` boots.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from stage4.dnbd3.client import Dnbd3Error, query_images
from stage4.dnbd3.protocol import MAX_RID
from stage4.dnbd3.store import Store, fsync_dir, parse_rid, validate_name
from stage4.errors import InputError, Stage4Error
from stage4.export import records
from stage4.export.reload import reload_server

BOOT_FILE = re.compile(r"^(?:kernel|initrd|config|config\.tgz|ipxe)\.r([0-9]+)$")
RECORD_FILE = re.compile(r"^publication\.r([0-9]+)\.json$")


def _rids_in(directory: Path, pattern: re.Pattern[str]) -> set[int]:
    found = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            match = pattern.match(entry.name)
            if match:
                found.add(int(match[1]))
    return found


def taken_rids(store: Store, name: str, boot_dirs: Iterable[Path] = ()) -> set[int]:
    """Revisions that must not be used again: any trace of one in the store, the records or a boot
    directory (a boot directory may be shared by several names; their files must not collide)."""
    meta = store.meta_dir(name)
    taken = store.taken_rids(name) | _rids_in(meta, RECORD_FILE) | _rids_in(meta, BOOT_FILE)
    for directory in boot_dirs:
        taken |= _rids_in(directory, BOOT_FILE)
    return taken


def next_rid(name: str, taken: set[int]) -> int:
    rid = max(taken, default=0) + 1
    if rid > MAX_RID:
        raise Stage4Error(
            f"{name}: revision {MAX_RID} is taken; no higher revision exists (prune, then use --rid)"
        )
    return rid


class RevisionRow(TypedDict):
    """One complete revision as `stage4 dnbd3 revisions` lists it."""

    rid: int
    file: str
    size: int | None
    crc: bool
    sha256: str | None
    published_at: str | None
    identity: str | None
    boot_dir: str


@dataclass
class RevisionState:
    name: str
    rid: int
    image: Path
    size: int | None
    record: dict[str, Any] | None  # the publication record (JSON, see records.read_record)
    boot_dir: Path
    present: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    def row(self) -> RevisionRow:
        record = self.record or {}
        return {
            "rid": self.rid,
            "file": str(self.image),
            "size": self.size,
            "crc": True,
            "sha256": record.get("sha256"),
            "published_at": record.get("published_at"),
            "identity": (record.get("source") or {}).get("identity"),
            "boot_dir": str(self.boot_dir),
        }


def states(store: Store, name: str) -> list[RevisionState]:
    """Every revision of `name` with a trace in the store or its records, oldest first."""
    validate_name(name)
    meta = store.meta_dir(name)
    found = []
    for rid in sorted(taken_rids(store, name)):
        if rid > MAX_RID:
            continue
        image = store.image_path(name, rid)
        record = records.read_record(store.root, name, rid)
        boot = (records.boot_dir_of(store.root, record) if record else None) or meta
        names = records.boot_files_of(record, rid) if record else [f"config.r{rid}"]
        expected = [image, store.crc_path(name, rid), records.record_path(store.root, name, rid)]
        expected += [boot / file for file in names]
        # leftovers in the name's own directory that the record does not name (or there is no record)
        expected += [
            meta / f"{kind}.r{rid}"
            for kind in ("kernel", "initrd", "config", "config.tgz", "ipxe")
            if meta / f"{kind}.r{rid}" not in expected and (meta / f"{kind}.r{rid}").exists()
        ]
        size = image.stat().st_size if image.is_file() else None
        state = RevisionState(name, rid, image, size, record, boot)
        for path in expected:
            (state.present if os.path.lexists(path) else state.missing).append(path)
        found.append(state)
    return found


def complete(store: Store, name: str) -> list[RevisionState]:
    return [state for state in states(store, name) if state.complete]


def incomplete(store: Store, name: str) -> list[RevisionState]:
    return [state for state in states(store, name) if not state.complete]


def _remove(state: RevisionState) -> None:
    """Withdraw a revision: the image first (clients stop finding it), then its other files."""
    for path in sorted(state.present, key=lambda p: p != state.image):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for directory in {path.parent for path in state.present}:
        with contextlib.suppress(OSError):
            fsync_dir(directory)


def repair(store: Store, name: str, *, pidfile: Path | None = None) -> list[int]:
    """Withdraw the incomplete revisions of `name` (left by a crashed export); returns their rids."""
    store.check()
    with store.lock():
        broken = incomplete(store, name)
        for state in broken:
            _remove(state)
    if broken and pidfile is not None:
        reload_server(pidfile)
    return [state.rid for state in broken]


def active_rids(store: Store, name: str, revisions: Sequence[RevisionState]) -> set[int]:
    """The revisions a `<boot-dir>/config` points clients at, and those whose kernel a `<boot-dir>/ipxe`
    boots."""
    boot_dirs = {store.meta_dir(name), *(state.boot_dir for state in revisions)}
    found = [records.active_rid(d, name) for d in boot_dirs] + [
        records.active_entry_rid(d, name) for d in boot_dirs
    ]
    return {rid for rid in found if rid is not None}


def prune(
    store: Path,
    name: str,
    keep: int,
    protect: Sequence[int | str] = (),
    *,
    dry_run: bool = False,
    pidfile: Path | None = None,
    servers: Sequence[str] | None = None,
    force: bool = False,
) -> list[int]:
    """Remove all but the newest `keep` complete revisions of `name`; never the newest, a protected one, an
    active one (the revision a `<boot-dir>/config` points at, whatever `keep` says), or one that a DNBD3
    server reports users for.

    The servers asked are `servers`, by default those recorded at export; a revision with users, or a
    server that cannot be asked, stops the prune (naming them) unless `force`. Removal follows
    docs/dnbd3-store.md ("Published files are immutable"): the image first, then its .crc, boot files and
    record; send SIGHUP afterwards (pidfile) so the server drops them.
    """
    if keep < 1:
        raise InputError("--keep must be at least 1 (the newest revision is never removed)")
    local = Store(Path(store))
    local.check()
    protected = {parse_rid(r) for r in protect}
    with local.lock():
        kept = complete(local, name)
        protected |= active_rids(local, name, kept)
        removable = [s for s in kept[:-keep] if s.rid not in protected] if len(kept) > keep else []
        if removable and not force:
            asked = list(servers) if servers is not None else recorded_servers(Path(store), name, kept)
            in_use = revisions_in_use(asked, name, [s.rid for s in removable])
            if in_use:
                raise Stage4Error(f"{name}: {in_use}; move the clients to a kept revision first, or --force")
        if not dry_run:
            for state in removable:
                _remove(state)
    if removable and pidfile is not None and not dry_run:
        reload_server(pidfile)
    return [state.rid for state in removable]


def recorded_servers(store: Path, name: str, states: Sequence[RevisionState]) -> list[str]:
    """The DNBD3 servers the revisions' records name (what the clients were told to use)."""
    found: list[str] = []
    for state in states:
        for server in (records.read_record(store, name, state.rid) or {}).get("servers", []):
            if server not in found:
                found.append(server)
    return found


def revisions_in_use(servers: Sequence[str], name: str, rids: Sequence[int]) -> str:
    """Why some of `rids` must not be removed ('' if none): users reported by a server, or a server that
    could not be asked (its answer is needed to know)."""
    problems = []
    for server in servers:
        try:
            images = query_images(server, timeout=5)
        except Dnbd3Error as exc:
            problems.append(
                f"cannot ask {server} whether revisions {', '.join(f'r{r}' for r in rids)} have users ({exc})"
            )
            continue
        for image in images:
            if image.get("name") == name and image.get("rid") in rids and int(image.get("users") or 0) > 0:
                problems.append(f"r{image['rid']} has {image['users']} user(s) on {server}")
    return "; ".join(problems)
