"""The `.crc` side file: the reference's verified test vectors and an independent computation."""

from __future__ import annotations

import binascii
import os
import struct

import pytest

from stage4.dnbd3.crc import block_crcs, crc_file_bytes, digest_and_copy
from stage4.errors import Stage4Error

MiB = 1 << 20

VECTORS = [
    (bytes(16 * MiB), "19 01 66 5f 4a a1 7c a4"),
    (bytes(5000), "cf 54 7c 19 94 99 f4 d8"),
    (bytes(16 * MiB + 5000), "a9 a6 dc fd 4a a1 7c a4 94 99 f4 d8"),
    (bytes(range(256)) * 16, "d3 9e db 0e 82 20 91 a2"),
]


@pytest.mark.parametrize(
    ("content", "expected"), VECTORS, ids=["16MiB-zero", "5000-zero", "16MiB+5000", "pattern"]
)
def test_reference_vectors(tmp_path, content, expected):
    assert crc_file_bytes(block_crcs(content)).hex(" ") == expected
    image = tmp_path / "img"
    image.write_bytes(content)
    assert digest_and_copy(image).crc_file.hex(" ") == expected


def test_crc_of_unpadded_5000_bytes_is_not_what_the_server_wants():
    assert block_crcs(bytes(5000)) == [0xD8F49994]
    assert binascii.crc32(bytes(5000)) == 0xD8E50EA8


def independent_crc_file(data: bytes) -> bytes:
    """Straight from the reference's wording, with binascii instead of zlib and no shared code."""
    padded = data + bytes(-len(data) % 4096)
    blocks = [binascii.crc32(padded[i : i + 16 * MiB]) for i in range(0, len(padded), 16 * MiB)]
    body = b"".join(struct.pack("<I", c) for c in blocks)
    return struct.pack("<I", binascii.crc32(body)) + body


@pytest.mark.parametrize(
    "size", [1, 4095, 4096, 4097, 16 * MiB - 1, 16 * MiB, 16 * MiB + 1, 33 * MiB + 12345]
)
def test_copy_and_digest_against_independent_computation(tmp_path, size):
    data = os.urandom(size)
    source = tmp_path / "src"
    source.write_bytes(data)
    fd = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    try:
        digest = digest_and_copy(source, fd)
    finally:
        os.close(fd)
    padded = data + bytes(-size % 4096)
    assert (tmp_path / "dst").read_bytes() == padded
    assert digest.real_size == size and digest.padded_size == len(padded)
    assert digest.crc_file == independent_crc_file(data)
    import hashlib

    assert digest.sha256 == hashlib.sha256(padded).hexdigest()


def test_empty_image_is_refused(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(Stage4Error, match="empty"):
        digest_and_copy(tmp_path / "empty")
