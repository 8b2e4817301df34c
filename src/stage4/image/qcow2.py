"""Reading a qcow2 header: the facts the client-side qcow2 driver (xloop) decides on.

xloop refuses images that are not version 2 or 3, that have a backing file, encryption, an external data
file, a dirty or corrupt bit, a cluster size outside 2^9..2^21, or a compression type other than zlib
and zstd (see shared/reference/stage4-boot.md §3.1). Layout per qemu's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

MAGIC = b"QFI\xfb"
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_METHODS = {0: "none", 1: "aes", 2: "luks"}


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

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def to_dict(self) -> dict:
        return {**asdict(self), "cluster_size": self.cluster_size}


def is_qcow2(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def read_header(path: Path) -> Qcow2Header:
    with path.open("rb") as handle:
        data = handle.read(4096)
    if len(data) < 72 or data[:4] != MAGIC:
        raise ValueError(f"{path} is not a qcow2 image")
    (_, version, backing_offset, backing_size, cluster_bits, size, crypt, _l1_size, _l1_offset,
     _refcount_offset, _refcount_clusters, snapshots, _snapshots_offset) = struct.unpack_from(">IIQIIQIIQQIIQ", data)
    incompatible, header_length, compression = 0, 72, 0
    if version >= 3 and len(data) >= 104:
        incompatible = struct.unpack_from(">Q", data, 72)[0]
        header_length = struct.unpack_from(">I", data, 100)[0]
        if header_length > 104:
            compression = data[104]
    backing = None
    if backing_offset and backing_size:
        with path.open("rb") as handle:
            handle.seek(backing_offset)
            backing = handle.read(backing_size).decode(errors="replace")
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
        if bool(incompatible & INCOMPAT_COMPRESSION) == (compression != 0) else "inconsistent",
        header_length=header_length,
        snapshots=snapshots,
    )
