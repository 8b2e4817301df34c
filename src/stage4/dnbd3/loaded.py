"""The images a DNBD3 development server has loaded: revisions found in the store, opened once selected,
their `.crc` lists, and which 16 MiB hash blocks passed their CRC check (each checked the first time a
read touches it, and again on `check_all`)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stage4.dnbd3 import protocol as p
from stage4.dnbd3.crc import CrcError, file_block_crc, parse_crc_file
from stage4.dnbd3.store import ANY_RID_FILE, SUBDIR_LEN, Store


def server_name_ok(name: str) -> bool:
    """The real server's name checks (image_getOrLoad): not empty, no leading '/' or '.', no trailing '/',
    no '/.' inside."""
    return bool(name) and not name.startswith(("/", ".")) and not name.endswith("/") and "/." not in name


@dataclass
class LoadedImage:
    id: int
    name: str
    rid: int
    path: Path
    real_size: int
    crc: bytes  # b"" when absent or discarded
    users: int = 0
    last_use: float = field(default_factory=time.time)
    checked: dict[int, bool] = field(default_factory=dict)  # hash block -> passed its CRC check
    check_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def virtual_size(self) -> int:
        return p.virtual_size(self.real_size)

    @functools.cached_property
    def block_crcs(self) -> list[int] | None:
        return parse_crc_file(self.crc) if self.crc else None

    def block_ok(self, index: int, fd: int, log: Callable[[str], None]) -> bool:
        """Whether hash block `index` matches the CRC list; checked once, then remembered.

        An image without a list is never checked (as on the real server, which then serves it unchecked).
        """
        crcs = self.block_crcs
        if crcs is None or self.checked.get(index):
            return True
        with self.check_lock:
            if index not in self.checked:
                try:
                    crc = file_block_crc(fd, index, self.real_size)
                except OSError as exc:
                    log(f"WARNING: CRC: read error in block {index} of {self.name}:{self.rid} ({exc})")
                    crc = None
                self.checked[index] = crc == crcs[index]
                if crc is not None and crc != crcs[index]:
                    log(
                        f"WARNING: Block {index} of {self.name}:{self.rid} is {crc:08x}, "
                        f"should be {crcs[index]:08x}"
                    )
                if not self.checked[index]:
                    start = index * p.HASH_BLOCK_SIZE
                    end = min(start + p.HASH_BLOCK_SIZE, self.virtual_size) - 1
                    log(
                        f"WARNING: Hash check for block {index} of {self.name}:{self.rid} failed: "
                        f"reads of bytes {start}..{end} are refused (connection closed)"
                    )
            return self.checked[index]

    def complete(self) -> int:
        """The real server's completeness estimate: a failed hash block counts as missing from its cache
        map (1 byte per 32 KiB; a full byte counts 100, an empty one 0)."""
        map_bytes = -(-self.virtual_size // (32 << 10))
        with self.check_lock:
            bad = [index for index, ok in self.checked.items() if not ok]
        missing = sum(
            -(-min(p.HASH_BLOCK_SIZE, self.virtual_size - i * p.HASH_BLOCK_SIZE) // (32 << 10)) for i in bad
        )
        return 100 * (map_bytes - missing) // map_bytes


class Registry:
    """The loaded images, keyed by (name, rid)."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root = Path(root)
        self.store = Store(self.root)
        self.log = log
        self._lock = threading.Lock()
        self._images: dict[tuple[str, int], LoadedImage] = {}
        self._next_id = 1

    def _load(self, name: str, rid: int, path: Path) -> LoadedImage | None:
        try:
            size = path.stat().st_size
            if not path.is_file() or not os.access(path, os.R_OK):
                return None
        except OSError:
            return None
        if size == 0:
            self.log(f"Empty image file '{path}'")
            return None
        crc = b""
        crc_path = path.with_name(path.name + ".crc")
        with contextlib.suppress(OSError):
            raw = crc_path.read_bytes()
            try:
                parse_crc_file(raw)
                needed = (-(-p.virtual_size(size) // p.HASH_BLOCK_SIZE) + 1) * 4
                if len(raw) < needed:
                    raise CrcError("too short")
                crc = raw[:needed]
            except CrcError as exc:
                self.log(f"Ignoring crc32 list for '{crc_path}': {exc}")
        image = LoadedImage(self._next_id, name, rid, path, size, crc)
        self._next_id += 1
        self._images[(name, rid)] = image
        self.log(f"Loaded image '{name}:{rid}' ({size} bytes)")
        return image

    def get(self, name: str, rid: int) -> LoadedImage | None:
        if not server_name_ok(name) or not 0 <= rid <= p.MAX_RID:
            return None
        with self._lock:
            if rid == 0:
                best = self._newest_on_disk(name)
                if best is not None and (name, best[0]) not in self._images:
                    self._load(name, best[0], best[1])
                candidates = [img for (n, _), img in self._images.items() if n == name]
                return max(candidates, key=lambda img: img.rid, default=None)
            image = self._images.get((name, rid))
            if image is None:
                image = self._load(name, rid, self.root / f"{name}.r{rid}")
            return image

    def _newest_on_disk(self, name: str) -> tuple[int, Path] | None:
        path = self.root / name
        leaf = path.name
        best: tuple[int, Path] | None = None
        with contextlib.suppress(OSError):
            for entry in os.scandir(path.parent):
                match = ANY_RID_FILE.match(entry.name)
                if not match or match["leaf"] != leaf:
                    continue
                rid = int(match["rid"])
                if 1 <= rid <= p.MAX_RID and (best is None or rid > best[0]):
                    best = (rid, Path(entry.path))
        if best is not None and not os.access(best[1], os.R_OK):
            self.log(f"rid {best[0]} globbed but not readable")
            return None
        return best

    def rescan(self) -> None:
        """Load new images, drop vanished ones and ones whose size changed (then reload them)."""
        self.log("Re-scanning image directory")
        with self._lock:
            on_disk = {
                (rev.name, rev.rid): rev
                for rev in self.store.all_images()
                if server_name_ok(rev.name)
                and all(len(c.encode()) <= SUBDIR_LEN for c in rev.name.split("/"))
            }
            for key, image in list(self._images.items()):
                rev = on_disk.get(key)
                if rev is None:
                    self.log(f"Freeing image {key[0]}:{key[1]}")
                    del self._images[key]
                elif rev.size != image.real_size:
                    self.log(f"WARNING: Size of image '{key[0]}:{key[1]}' has changed.")
                    del self._images[key]
            for key, rev in on_disk.items():
                if key not in self._images:
                    self._load(rev.name, rev.rid, rev.path)

    def check_all(self) -> None:
        """Forget every remembered CRC result and check every hash block of every loaded image again (the
        real server's SIGUSR1)."""
        self.log("Verifying checksum of all images")
        for image in self.loaded():
            crcs = image.block_crcs  # None exactly when image.crc is empty
            if crcs is not None:
                with image.check_lock:
                    image.checked.clear()
                try:
                    with open(image.path, "rb") as handle:
                        for index in range(len(crcs)):
                            image.block_ok(index, handle.fileno(), self.log)
                except OSError as exc:
                    self.log(f"WARNING: cannot check {image.name}:{image.rid}: {exc}")

    def loaded(self) -> list[LoadedImage]:
        with self._lock:
            return sorted(self._images.values(), key=lambda img: (img.name, img.rid))
