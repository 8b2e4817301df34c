"""File-system helpers shared by the pipeline: atomic placement, safe removal, hashing, mounts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypedDict


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileFacts(TypedDict):
    """A file's entry in a manifest's `files`."""

    size: int
    sha256: str


def file_facts(folder: Path, *relatives: str) -> dict[str, FileFacts]:
    """The `files` entry of a manifest: size and sha256 of each file, relative to `folder`."""
    return {
        rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in relatives
    }


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place_atomically(source: Path, target: Path) -> None:
    """Move a finished file into place: fsync it, rename it over `target`, fsync the directory.

    `source` must be in the target's directory (a dot-prefixed temporary name), so the rename is atomic.
    """
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)


def write_json_atomically(target: Path, data: object) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    place_atomically(tmp, target)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == root or mount_point.startswith(root + "/"):
                found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def unmount_below(path: Path) -> None:
    for mount_point in mounts_below(path):
        subprocess.run(["umount", "--lazy", mount_point], check=False, capture_output=True)


def remove_tree(path: Path) -> None:
    """Remove a work tree that may still hold mounts (a chroot): unmount first, never cross file systems."""
    if not path.exists() and not path.is_symlink():
        return
    unmount_below(path)
    if path.is_dir() and not path.is_symlink():
        # --one-file-system: a bind mount that survived would otherwise lose the host's files.
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, capture_output=True)
    else:
        path.unlink()


@contextlib.contextmanager
def temporary_sibling(target: Path) -> Iterator[Path]:
    """A dot-prefixed temporary path beside `target`; removed unless the caller moved it into place."""
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold an flock on `path`; call `on_wait` once if another process holds it, then wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dir_size(path: Path) -> int:
    """Bytes of the regular files below `path` (apparent size, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
