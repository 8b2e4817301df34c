"""What a client finds in a served image: the qcow2 header, the GPT inside, the root partition and its label.

Everything is read through a `read(offset, size)` function (over DNBD3, or from a file), so that
`stage4 dnbd3 verify` sees exactly the bytes a client sees. Only as much of qcow2 as reading a few
clusters needs: L1/L2 lookup, zero clusters, zlib-compressed clusters and (with the `zstandard` package)
zstd-compressed clusters. Every table offset and size is checked against the image size before it is read.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from stage4.errors import Stage4Error
from stage4.image.qcow2 import Qcow2Header

Read = Callable[[int, int], bytes]

OFFSET_BITS = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
ZERO_FLAG = 1
MAX_TABLE = 32 << 20
SECTOR = 512


class DiskError(Stage4Error):
    """The image's structure is not what a client could use."""


class Qcow2Disk:
    """Reads the virtual disk inside a qcow2 image through `read` (the image's own bytes)."""

    def __init__(self, read: Read, facts: Qcow2Header, image_size: int):
        problems = facts.problems() + (["extended L2 entries (not read here)"] if facts.extended_l2 else [])
        if problems:
            raise DiskError("cannot read inside the qcow2: " + "; ".join(problems))
        self.read_image, self.facts, self.image_size = read, facts, image_size
        self.cluster_size = 1 << facts.cluster_bits
        self.l2_entries = self.cluster_size // 8
        if facts.l1_size * 8 > MAX_TABLE:
            raise DiskError(f"L1 table of {facts.l1_size} entries is implausibly large")
        self.l1 = struct.unpack(
            f">{facts.l1_size}Q", self._image(facts.l1_offset, facts.l1_size * 8, "L1 table")
        )
        self._l2_cache: dict[int, tuple[int, ...]] = {}

    def _image(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.image_size:
            raise DiskError(f"{what} at {offset}+{size} lies outside the image ({self.image_size} bytes)")
        data = self.read_image(offset, size)
        if len(data) != size:
            raise DiskError(f"short read of {what}")
        return data

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.facts.virtual_size:
            raise DiskError(
                f"disk read {offset}+{size} lies outside the virtual disk ({self.facts.virtual_size} bytes)"
            )
        out = bytearray()
        while size > 0:
            within = offset % self.cluster_size
            step = min(size, self.cluster_size - within)
            out += self._cluster(offset - within)[within : within + step]
            offset += step
            size -= step
        return bytes(out)

    def _cluster(self, offset: int) -> bytes:
        index = offset // self.cluster_size
        l1_index, l2_index = divmod(index, self.l2_entries)
        if l1_index >= len(self.l1):
            return bytes(self.cluster_size)
        l2_offset = self.l1[l1_index] & OFFSET_BITS
        if not l2_offset:
            return bytes(self.cluster_size)
        table = self._l2_cache.get(l2_offset)
        if table is None:
            raw = self._image(l2_offset, self.cluster_size, "L2 table")
            table = struct.unpack(f">{self.l2_entries}Q", raw)
            self._l2_cache[l2_offset] = table
        entry = table[l2_index]
        if entry & COMPRESSED:
            return self._compressed(entry)
        host = entry & OFFSET_BITS
        if entry & ZERO_FLAG or not host:
            return bytes(self.cluster_size)
        return self._image(host, self.cluster_size, "data cluster")

    def _compressed(self, entry: int) -> bytes:
        x = 62 - (self.facts.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (self.facts.cluster_bits - 8)) - 1)) + 1
        length = min(sectors * SECTOR - (host % SECTOR), self.image_size - host)
        data = self._image(host, max(length, 0), "compressed cluster")
        if self.facts.compression == "zstd":
            return _zstd_cluster(data, self.cluster_size).ljust(self.cluster_size, b"\0")
        try:
            result = zlib.decompressobj(-12).decompress(data, self.cluster_size)
        except zlib.error as exc:
            raise DiskError(f"compressed cluster at {host} does not inflate: {exc}") from None
        return result.ljust(self.cluster_size, b"\0")


def _zstd_cluster(data: bytes, cluster_size: int) -> bytes:
    """Inflate the one zstd frame of a compressed cluster, in process (the `zstandard` package).

    The bytes after the frame (the rest of the last sector) are ignored, and the output is bounded by
    the cluster size, so a hostile image cannot make one cluster inflate to gigabytes.
    """
    try:
        import zstandard
    except ImportError:
        raise DiskError(
            "zstd-compressed cluster, and the zstandard Python package is missing (run ./install.sh)"
        ) from None
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=False)
    out = bytearray()
    try:
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise DiskError(f"zstd-compressed cluster does not decode: {exc}") from None
    return bytes(out)


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    first_lba: int
    last_lba: int

    @property
    def offset(self) -> int:
        return self.first_lba * SECTOR

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * SECTOR


def gpt_partitions(read: Read, disk_size: int) -> list[Partition]:
    """Partitions of the GPT on a 512-byte-sector disk (xloop exposes 512-byte sectors)."""
    if disk_size < 2 * SECTOR:
        raise DiskError("disk too small for a GPT")
    header = read(SECTOR, SECTOR)
    if header[:8] != b"EFI PART":
        raise DiskError("no GPT found (no 'EFI PART' at LBA 1)")
    header_size = struct.unpack_from("<I", header, 12)[0]
    if not 92 <= header_size <= SECTOR:
        raise DiskError(f"GPT header size {header_size} is invalid")
    stored = struct.unpack_from("<I", header, 16)[0]
    check = bytearray(header[:header_size])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != stored:
        raise DiskError("GPT header CRC mismatch")
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    if not 128 <= entry_size <= 4096 or entry_size % 8 or count > 4096:
        raise DiskError(f"GPT with {count} entries of {entry_size} bytes is implausible")
    table_offset, table_size = entries_lba * SECTOR, count * entry_size
    if table_offset + table_size > disk_size:
        raise DiskError("GPT partition table lies outside the disk")
    table = read(table_offset, table_size)
    if zlib.crc32(table) != struct.unpack_from("<I", header, 88)[0]:
        raise DiskError("GPT partition table CRC mismatch")
    found = []
    for number in range(count):
        entry = table[number * entry_size : (number + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        found.append(Partition(number + 1, name, first, last))
    return found


def filesystem(read: Read, partition: Partition) -> tuple[str | None, str | None]:
    """(type, label) of the filesystem on `partition`: ext2/3/4, xfs or btrfs."""
    if partition.size >= 2048:
        sb = read(partition.offset + 1024, 1024)
        if struct.unpack_from("<H", sb, 56)[0] == 0xEF53:
            return "ext4", sb[120:136].split(b"\0", 1)[0].decode(errors="replace")
    if partition.size >= 512:
        sb = read(partition.offset, 512)
        if sb[:4] == b"XFSB":
            return "xfs", sb[108:120].split(b"\0", 1)[0].decode(errors="replace")
    if partition.size >= 65536 + 4096:
        sb = read(partition.offset + 65536, 4096)
        if sb[64:72] == b"_BHRfS_M":
            return "btrfs", sb[299:555].split(b"\0", 1)[0].decode(errors="replace")
    return None, None
