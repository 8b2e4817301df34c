"""The `.crc` side file of a DNBD3 image (docs/dnbd3-store.md, "CRC file").

Layout: a little-endian uint32 master CRC (the CRC-32 of the list that follows), then one little-endian
uint32 CRC-32 per 16 MiB hash block. N = ceil(virtual size / 16 MiB), the file is exactly (N+1)*4 bytes.
The last block is CRC'd over the real bytes plus zeros up to the next 4 KiB boundary only (not up to
16 MiB), so padding the image itself to a multiple of 4096 gives the same bytes. zlib's CRC-32 with
start value 0 is the algorithm the server uses.

`digest_and_copy` computes the CRC list and the SHA-256 of the padded file in one pass over the source,
optionally copying it at the same time: the kernel copies (copy_file_range) while two threads hash the
mmap'ed source, so the copy costs little more than `cp` (each of zlib.crc32, hashlib and copy_file_range
releases the GIL).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from stage4.dnbd3.protocol import BLOCK_SIZE, HASH_BLOCK_SIZE, virtual_size
from stage4.errors import Stage4Error

_ZERO_PAGE = bytes(BLOCK_SIZE)
_COPY_CHUNK = 64 << 20
_READ_CHUNK = 1 << 20
# copy_file_range / sendfile not possible here (other filesystem, old kernel): fall back.
_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSUP}


_T = TypeVar("_T")
_P = ParamSpec("_P")


class CrcError(Stage4Error):
    """A `.crc` list that the server would discard."""


def block_count(size: int) -> int:
    """Number of 16 MiB hash blocks for an image of `size` bytes (real or virtual: same result)."""
    return -(-virtual_size(size) // HASH_BLOCK_SIZE)


def pad_length(real_size: int) -> int:
    return virtual_size(real_size) - real_size


def _crc_zeros(crc: int, count: int) -> int:
    while count > 0:
        step = min(count, BLOCK_SIZE)
        crc = zlib.crc32(_ZERO_PAGE[:step], crc)
        count -= step
    return crc


def block_crcs(data: bytes | bytearray | memoryview | mmap.mmap) -> list[int]:
    """Block CRCs of an image whose whole content is `data` (padded to 4 KiB as the server does)."""
    view = memoryview(data)
    real = len(view)
    crcs = []
    for start in range(0, real, HASH_BLOCK_SIZE):
        chunk = view[start : start + HASH_BLOCK_SIZE]
        crc = zlib.crc32(chunk)
        if len(chunk) < HASH_BLOCK_SIZE:
            crc = _crc_zeros(crc, pad_length(real))
        crcs.append(crc)
    return crcs


def file_block_crc(fd: int, index: int, real_size: int) -> int:
    """CRC of hash block `index` of the open image file `fd` of `real_size` bytes, computed as the server
    does: the last block over its real bytes plus zeros up to the next 4 KiB boundary."""
    start = index * HASH_BLOCK_SIZE
    end = min(start + HASH_BLOCK_SIZE, real_size)
    crc, offset = 0, start
    while offset < end:
        data = os.pread(fd, min(_READ_CHUNK, end - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"image shorter than {real_size} bytes")
        crc = zlib.crc32(data, crc)
        offset += len(data)
    return _crc_zeros(crc, pad_length(real_size)) if end == real_size else crc


def crc_file_bytes(crcs: list[int]) -> bytes:
    """The `.crc` file content for a list of block CRCs."""
    body = struct.pack(f"<{len(crcs)}I", *crcs)
    return struct.pack("<I", zlib.crc32(body)) + body


def parse_crc_file(data: bytes, image_size: int | None = None) -> list[int]:
    """The block CRCs of a `.crc` file; CrcError if the server would discard it (short, bad master)."""
    if len(data) < 8 or len(data) % 4:
        raise CrcError(f"CRC list of {len(data)} bytes is malformed (needs 4 + 4*N bytes, N >= 1)")
    if image_size is not None:
        needed = (block_count(image_size) + 1) * 4
        if len(data) != needed:
            raise CrcError(
                f"CRC list has {len(data)} bytes, {needed} expected for an image of {image_size} bytes"
            )
    (master,) = struct.unpack_from("<I", data, 0)
    body = data[4:]
    if zlib.crc32(body) != master:
        raise CrcError(f"master CRC 0x{master:08x} does not match the list (0x{zlib.crc32(body):08x})")
    return list(struct.unpack(f"<{len(body) // 4}I", body))


@dataclass(frozen=True)
class Digest:
    real_size: int
    padded_size: int
    crc_file: bytes
    sha256: str  # of the padded content


def digest_and_copy(source: Path, dest_fd: int | None = None) -> Digest:
    """CRC list and SHA-256 of `source` padded to 4 KiB; with dest_fd, also copy it there, padded.

    The copy runs in the kernel (copy_file_range, falling back to sendfile and then to read/write) on
    one thread while CRC and SHA-256 are computed from an mmap of the source on two others.
    """
    with open(source, "rb") as src:
        real = os.fstat(src.fileno()).st_size
        if real == 0:
            raise Stage4Error(f"{source}: empty file; the DNBD3 server refuses empty images")
        padded = virtual_size(real)
        with mmap.mmap(src.fileno(), real, access=mmap.ACCESS_READ) as mapped:
            with contextlib.suppress(OSError, AttributeError):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                sha: list[str] = []
                crcs: list[list[int]] = []
                copied: list[None] = []
                errors: list[BaseException] = []

                def guarded(
                    out: list[_T], func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
                ) -> None:
                    try:
                        out.append(func(*args, **kwargs))
                    except BaseException as exc:  # re-raised in the caller's thread below
                        errors.append(exc)

                threads = [threading.Thread(target=guarded, args=(sha, _sha256, view, padded - real))]
                if dest_fd is not None:
                    threads.append(
                        threading.Thread(target=guarded, args=(copied, _copy, src.fileno(), dest_fd, real))
                    )
                for thread in threads:
                    thread.start()
                guarded(crcs, block_crcs, view)
                for thread in threads:
                    thread.join()
                if errors:
                    raise errors[0]
            finally:
                view.release()
        if dest_fd is not None and padded != real:
            os.ftruncate(dest_fd, padded)
    return Digest(real, padded, crc_file_bytes(crcs[0]), sha[0])


def _sha256(view: memoryview, pad: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(view), _COPY_CHUNK):
        digest.update(view[start : start + _COPY_CHUNK])
    digest.update(bytes(pad))
    return digest.hexdigest()


def _copy(src_fd: int, dst_fd: int, size: int) -> None:
    offset = 0
    for method in ("copy_file_range", "sendfile"):
        try:
            while offset < size:
                step = min(_COPY_CHUNK, size - offset)
                if method == "copy_file_range":
                    done = os.copy_file_range(src_fd, dst_fd, step, offset, offset)
                else:
                    os.lseek(dst_fd, offset, os.SEEK_SET)
                    done = os.sendfile(dst_fd, src_fd, offset, step)
                if done == 0:
                    raise Stage4Error("source file shrank while it was being copied")
                offset += done
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
    os.lseek(dst_fd, offset, os.SEEK_SET)
    while offset < size:
        data = os.pread(src_fd, min(_COPY_CHUNK, size - offset), offset)
        if not data:
            raise Stage4Error("source file shrank while it was being copied")
        view = memoryview(data)
        while view:
            written = os.write(dst_fd, view)
            view = view[written:]
        offset += len(data)
