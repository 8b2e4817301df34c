"""The image store as dnbd3-server reads it (docs/dnbd3-store.md: where the server looks, names and revisions,
publishing recipe).

`<store>/<name>.r<RID>` with `<name>` a relative path (sub-directories become part of the name), RID a
plain decimal 1..65535, side file `<name>.r<RID>.crc`. Entries starting with '.' are invisible to the
server, which is why every temporary file and stage4's own bookkeeping (`.stage4/`, `.stage4.lock`)
start with one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stage4.dnbd3.protocol import MAX_PAYLOAD, MAX_RID
from stage4.errors import InputError, Stage4Error

SUBDIR_LEN = 150  # the server skips directory entries with longer names
RID_SUFFIX_MAX = len(".r65535")
# 2 (version) + name + NUL + 13 in the SELECT_IMAGE reply must fit MAX_PAYLOAD.
MAX_NAME_BYTES = MAX_PAYLOAD - 13
# Conservative: the name goes through glob() in the server (RID 0), shell config files and kernel
# command lines; '*?[]' would be glob patterns, whitespace and quotes break unquoted shell use.
NAME_CHARS = re.compile(r"^[A-Za-z0-9._+@,=~-]+$")
ALLOWED_TEXT = "letters, digits and . _ - + @ , = ~"
RID_FILE = re.compile(r"^(?P<leaf>.+)\.r(?P<rid>[1-9][0-9]{0,4})$")
# What the server's scanner takes for a revision (it parses the digits numerically, leading zeros too).
ANY_RID_FILE = re.compile(r"^(?P<leaf>.+)\.r(?P<rid>[0-9]+)$")
FORBIDDEN_SUFFIXES = (".crc", ".map", ".meta")
META_DIR = ".stage4"
LOCK_FILE = ".stage4.lock"
TEMP_MARK = ".stage4-"
TEMP_SUFFIX = ".part"


def validate_name(name: str) -> str:
    """Return `name` if dnbd3-server can serve it and stage4 can write it; else InputError (one line)."""

    def bad(problem: str) -> InputError:
        return InputError(f"image name {name!r}: {problem}")

    if not name:
        raise bad("empty")
    if name.startswith("/"):
        raise bad("must be relative to the store (no leading '/')")
    if name.endswith("/"):
        raise bad("must not end with '/'")
    if "//" in name:
        raise bad("empty path component ('//'); the server would register a second image for it")
    parts = name.split("/")
    for part in parts:
        if part in (".", ".."):
            raise bad(f"path component {part!r} is not allowed")
        if part.startswith("."):
            raise bad(f"component {part!r} starts with '.'; the server skips hidden files and directories")
        bad_chars = sorted({c for c in part if not NAME_CHARS.match(c)})
        if bad_chars:
            raise bad(f"character {bad_chars[0]!r} is not allowed (use {ALLOWED_TEXT})")
    encoded = name.encode()
    if len(encoded) > MAX_NAME_BYTES:
        raise bad(f"{len(encoded)} bytes; a DNBD3 handshake carries at most {MAX_NAME_BYTES}")
    for part in parts[:-1]:
        if len(part.encode()) > SUBDIR_LEN:
            raise bad(f"directory {part[:20]!r}... is longer than the server's {SUBDIR_LEN}-byte limit")
    leaf = parts[-1]
    if len(leaf.encode()) + RID_SUFFIX_MAX > SUBDIR_LEN:
        limit = SUBDIR_LEN - RID_SUFFIX_MAX
        raise bad(f"last component is longer than {limit} bytes (the file name with '.r<RID>' must fit {SUBDIR_LEN})")
    if ANY_RID_FILE.match(leaf):
        raise bad("must not end in '.r<number>' (the server would read that as a revision)")
    if leaf.endswith(FORBIDDEN_SUFFIXES):
        raise bad("must not end in .crc, .map or .meta")
    return name


def parse_rid(value: str | int) -> int:
    """A revision ID: plain decimal 1..65535, no leading zeros; else InputError."""
    text = str(value).strip()
    if not re.fullmatch(r"[1-9][0-9]*", text) or int(text) > MAX_RID:
        raise InputError(f"revision {value!r}: must be a plain decimal number 1..{MAX_RID} without leading zeros")
    return int(text)


@dataclass(frozen=True)
class Revision:
    name: str
    rid: int
    path: Path
    size: int
    has_crc: bool

    @property
    def crc_path(self) -> Path:
        return self.path.with_name(self.path.name + ".crc")


class Store:
    """A local store directory (the server's basePath)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def check(self) -> None:
        if not self.root.is_dir():
            raise InputError(f"store {self.root}: not a directory")

    def image_path(self, name: str, rid: int) -> Path:
        return self.root / f"{validate_name(name)}.r{rid}"

    def crc_path(self, name: str, rid: int) -> Path:
        return self.root / f"{validate_name(name)}.r{rid}.crc"

    def meta_dir(self, name: str) -> Path:
        return self.root / META_DIR / validate_name(name)

    def revisions(self, name: str) -> list[Revision]:
        """Published revisions of `name` (canonical `.r<RID>` files only), oldest first."""
        validate_name(name)
        directory = (self.root / name).parent
        leaf = name.rsplit("/", 1)[-1]
        found = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = RID_FILE.match(entry.name)
            if not match or match["leaf"] != leaf or int(match["rid"]) > MAX_RID:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if not entry.is_file():
                continue
            found.append(Revision(name, int(match["rid"]), Path(entry.path), st.st_size,
                                  os.path.exists(entry.path + ".crc")))
        return sorted(found, key=lambda r: r.rid)

    def taken_rids(self, name: str) -> set[int]:
        """RIDs that must not be used again: published images, and `.crc` files left without an image."""
        directory = (self.root / name).parent
        leaf = name.rsplit("/", 1)[-1]
        taken = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                base = entry.name.removesuffix(".crc")
                match = ANY_RID_FILE.match(base)
                if match and match["leaf"] == leaf:
                    taken.add(int(match["rid"]))
        return taken

    def next_rid(self, name: str) -> int:
        taken = self.taken_rids(name)
        rid = max(taken, default=0) + 1
        if rid > MAX_RID:
            raise Stage4Error(f"{name}: revision {MAX_RID} is taken; no higher revision exists (prune, then use --rid)")
        return rid

    def all_images(self) -> list[Revision]:
        """Every image the server would load: a recursive scan that skips hidden entries and side files."""
        found: list[Revision] = []

        def scan(directory: Path, prefix: str) -> None:
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                return
            for entry in entries:
                if entry.name.startswith(".") or len(entry.name.encode()) > SUBDIR_LEN:
                    continue
                try:
                    is_dir = entry.is_dir()
                    is_file = entry.is_file()
                except OSError:
                    continue
                if is_dir:
                    scan(Path(entry.path), f"{prefix}{entry.name}/")
                    continue
                if not is_file or entry.name.endswith(FORBIDDEN_SUFFIXES):
                    continue
                match = RID_FILE.match(entry.name)
                if not match or int(match["rid"]) > MAX_RID:
                    continue
                try:
                    size = entry.stat().st_size
                except OSError:
                    continue
                if size:
                    found.append(Revision(prefix + match["leaf"], int(match["rid"]), Path(entry.path), size,
                                          os.path.exists(entry.path + ".crc")))

        scan(self.root, "")
        return found

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock of the whole store (held only for the short commit of a publication)."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove_stale_temporaries(self, directory: Path) -> list[Path]:
        """Delete temporary files of exports that died (no process holds their lock). Call under lock()."""
        removed = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                if not (entry.name.startswith(".") and TEMP_MARK in entry.name and entry.name.endswith(TEMP_SUFFIX)):
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    continue  # a running export owns it
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                finally:
                    os.close(fd)
        return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
