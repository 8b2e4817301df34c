"""Archives for the tests of config.tgz: a gzip'ed tar with the given members, names taken as they are."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tgz(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """`members`: files by name; `links`: symbolic links by name, to their targets."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return path
