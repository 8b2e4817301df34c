"""Archives for the tests of config.tgz: a gzip'ed tar with the given members, names taken as they are."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path
