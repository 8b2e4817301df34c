"""Hidden temporaries, exclusive links and directories created on the way: the file operations of an export.

Every file an export writes is first a hidden temporary (`.<stem>.stage4-<token>[kind].part`, skipped by
dnbd3-server's scan), flock'ed while its export runs so that a crashed export's leftovers can be told
apart from a running one's. A temporary becomes visible only through `link_exclusive` (never over an
existing file) or, for the one file that is meant to be replaced (`<boot-dir>/config`), `os.replace`.
Write errors become one-line Stage4Errors naming what was being written and where.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from stage4.dnbd3.store import TEMP_MARK, TEMP_SUFFIX
from stage4.errors import InputError, Stage4Error

# Filesystems without hard links answer EPERM, EOPNOTSUPP or ENOSYS.
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)


def write_error(what: str, where: Path | str, exc: OSError) -> Stage4Error:
    """One line for a failed write: what, where, and the system's reason."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        return InputError(f"cannot write {what} to {where}: read-only file system")
    return Stage4Error(f"cannot write {what} to {where}: {reason}")


class TempFile:
    """A hidden temporary file in `directory`, flock'ed while we own it, removed unless it was moved."""

    def __init__(self, directory: Path, stem: str, token: str, kind: str = "", what: str = ""):
        self.directory = Path(directory)
        self.what = what or stem
        self.path = self.directory / f".{stem}{TEMP_MARK}{token}{kind}{TEMP_SUFFIX}"
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise write_error(self.what, self.directory, exc) from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def failed(self, exc: OSError) -> Stage4Error:
        return write_error(self.what, self.directory, exc)

    def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as exc:
            raise self.failed(exc) from None

    def copy_from(self, source: Path) -> None:
        try:
            with source.open("rb") as src:
                size = os.fstat(src.fileno()).st_size
                offset = 0
                while offset < size:
                    sent = os.sendfile(self.fd, src.fileno(), offset, min(size - offset, 64 << 20))
                    if sent == 0:
                        raise Stage4Error(f"{source} shrank while it was being copied")
                    offset += sent
            os.fsync(self.fd)
        except OSError as exc:
            raise self.failed(exc) from None

    def replace(self, target: Path) -> None:
        """Move the temporary over `target` (for the one file that is meant to be replaced)."""
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise self.failed(exc) from None
        self._release()

    def link(self, target: Path, what: str) -> None:
        """Give the temporary its final name, refusing if that exists."""
        link_exclusive(self.path, target, what)

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Remove the temporary (its final name, if linked, stays)."""
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._release()


def link_exclusive(source: Path, target: Path, what: str) -> None:
    """Give `source` the name `target`, refusing if `target` exists (hard link; rename as a fallback on
    filesystems without hard links, safe under the store lock)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise InputError(f"{target} exists; {what} is never overwritten (publish a new revision)") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise write_error(what, target.parent, exc) from None
        if os.path.lexists(target):
            raise InputError(
                f"{target} exists; {what} is never overwritten (publish a new revision)"
            ) from None
        os.rename(source, target)


class CreatedDirs:
    """Directories made for an export, so that a failed export leaves no empty one behind."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def make(self, directory: Path, what: str) -> Path:
        missing = []
        for parent in [directory, *directory.parents]:
            if parent.is_dir():
                break
            missing.append(parent)
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise write_error(what, path.parent, exc) from None
            self.made.append(path)
        return directory

    def remove_empty(self) -> None:
        for path in reversed(self.made):
            with contextlib.suppress(OSError):
                path.rmdir()
        self.made.clear()
