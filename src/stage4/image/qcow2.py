"""Reading a qcow2 header: the facts the client-side qcow2 driver (xloop) decides on.

xloop refuses images that are not version 2 or 3, that have a backing file, encryption, an external data
file, a dirty or corrupt bit, a cluster size outside 2^9..2^21, or a compression type other than zlib
and zstd (docs/qcow2-for-xloop.md). Layout per qemu's docs/interop/qcow2.txt.
Used by `stage4 inspect` on files and by `stage4 dnbd3 verify` on what a server sends.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from stage4.errors import Stage4Error

MAGIC = b"QFI\xfb"
HEADER_V2 = 72
HEADER_V3 = 104
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_METHODS = {0: "none", 1: "aes", 2: "luks"}


class Qcow2Error(Stage4Error):
    """A qcow2 header that cannot be read."""


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    virtual_size: int
    backing_file: str | None
    encryption: str
    dirty: bool
    corrupt: bool
    external_data_file: bool
    extended_l2: bool
    compression: str
    header_length: int
    snapshots: int
    l1_size: int
    l1_offset: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def client_checks(self) -> list[tuple[str, bool, str]]:
        """(condition, met, detail) for each thing xloop requires of an image."""
        backing = self.backing_file
        return [
            ("format is qcow2 v2 or v3", self.version in (2, 3), f"version {self.version}"),
            (
                "no backing file",
                backing is None,
                f"backing file {backing}; flatten the chain first" if backing else "",
            ),
            (
                "not dirty, not corrupt",
                not self.dirty and not self.corrupt,
                f"dirty={self.dirty} corrupt={self.corrupt}",
            ),
            ("no encryption", self.encryption == "none", self.encryption),
            ("no external data file", not self.external_data_file, ""),
            ("compression zlib or zstd", self.compression in ("zlib", "zstd"), self.compression),
            ("cluster size 512 B .. 2 MiB", 9 <= self.cluster_bits <= 21, f"2^{self.cluster_bits} bytes"),
        ]

    def problems(self) -> list[str]:
        return [f"{name}: {detail}" for name, met, detail in self.client_checks() if not met]

    def describe(self) -> str:
        return (
            f"qcow2 v{self.version}, virtual size {self.virtual_size} bytes, "
            f"cluster {self.cluster_size} bytes, "
            f"compression {self.compression}, backing file {self.backing_file or 'none'}"
        )

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "cluster_size": self.cluster_size}


def is_qcow2(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def parse_header(data: bytes) -> Qcow2Header | None:
    """The header at the start of `data`; None if it is not qcow2. A backing file name outside `data`
    is reported by its place."""
    if len(data) < 4 or data[:4] != MAGIC:
        return None
    if len(data) < HEADER_V2:
        raise Qcow2Error("qcow2 header is truncated")
    (
        _,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_offset,
        _refcount_offset,
        _refcount_clusters,
        snapshots,
        _snapshots_offset,
    ) = struct.unpack_from(">IIQIIQIIQQIIQ", data)
    incompatible, header_length, compression = 0, HEADER_V2, 0
    if version >= 3:
        if len(data) < HEADER_V3:
            raise Qcow2Error("qcow2 v3 header is truncated")
        incompatible = struct.unpack_from(">Q", data, 72)[0]
        header_length = struct.unpack_from(">I", data, 100)[0]
        if header_length > HEADER_V3 and len(data) > HEADER_V3:
            compression = data[HEADER_V3]
    backing = None
    if backing_offset:
        end = backing_offset + backing_size
        backing = (
            data[backing_offset:end].decode(errors="replace")
            if end <= len(data)
            else f"(a name at offset {backing_offset})"
        )
    consistent = bool(incompatible & INCOMPAT_COMPRESSION) == (compression != 0)
    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=size,
        backing_file=backing,
        encryption=CRYPT_METHODS.get(crypt, f"unknown ({crypt})"),
        dirty=bool(incompatible & INCOMPAT_DIRTY),
        corrupt=bool(incompatible & INCOMPAT_CORRUPT),
        external_data_file=bool(incompatible & INCOMPAT_DATA_FILE),
        extended_l2=bool(incompatible & INCOMPAT_EXTL2),
        compression=COMPRESSION_TYPES.get(compression, f"unknown ({compression})")
        if consistent
        else "inconsistent",
        header_length=header_length,
        snapshots=snapshots,
        l1_size=l1_size,
        l1_offset=l1_offset,
    )


def read_header(path: Path) -> Qcow2Header:
    with path.open("rb") as handle:
        header = parse_header(handle.read(65536))
    if header is None:
        raise Qcow2Error(f"{path} is not a qcow2 image")
    return header
