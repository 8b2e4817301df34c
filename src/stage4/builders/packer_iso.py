"""The installer ISO of a Packer base and its checksum: a local file or a URL, the checksum literal or
from a checksum file, always verified before Packer runs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

from stage4 import distributions
from stage4.errors import InputError

HASH_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}


def _is_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https", "ftp")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_from_file(sums: Path, iso_name: str) -> str:
    """Find `iso_name` in a GNU (`<hex>  name`) or BSD (`SHA256 (name) = <hex>`) checksum file."""
    try:
        text = sums.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read checksum file {sums}: {exc.strerror}") from None
    for line in text.splitlines():
        bsd = re.match(r"^\s*(MD5|SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$", line)
        if bsd and Path(bsd.group(2)).name == iso_name:
            return f"{bsd.group(1).lower()}:{bsd.group(3).lower()}"
        gnu = re.match(r"^\s*([0-9A-Fa-f]+)\s+\*?(.+?)\s*$", line)
        if gnu and Path(gnu.group(2)).name == iso_name and len(gnu.group(1)) in HASH_LENGTHS:
            return f"{HASH_LENGTHS[len(gnu.group(1))]}:{gnu.group(1).lower()}"
    raise InputError(f"checksum file {sums} has no entry for {iso_name}")


def _literal_checksum(text: str) -> str | None:
    """'sha256:<hex>' or a bare hex digest as '<algorithm>:<hex>'; None if it is neither."""
    match = re.fullmatch(r"(?:(md5|sha1|sha256|sha512):)?([0-9A-Fa-f]+)", text.strip())
    if not match:
        return None
    algorithm, digest = match.group(1), match.group(2).lower()
    expected = HASH_LENGTHS.get(len(digest))
    if expected is None or (algorithm and algorithm != expected):
        raise InputError(
            f"iso checksum {text!r}: a {algorithm or 'hex'} digest of {len(digest)} digits is not valid"
        )
    return f"{expected}:{digest}"


def resolve_iso(
    dist: type[distributions.Distribution], iso: str | None, checksum: str | None
) -> tuple[str, str]:
    """The `iso_url` and `iso_checksum` for Packer. A checksum is always required and never 'none'.

    A local ISO is verified here (a clear error beats Packer's), against a literal digest or its line in
    a local checksum file; a remote checksum file is left for Packer to download and check.
    """
    if checksum is not None and checksum.strip().lower() in ("", "none"):
        raise InputError("iso checksum 'none' is not accepted: stage4 always verifies the installer ISO")
    if iso is None:
        if checksum is None:
            return dist.iso_url, dist.iso_checksum
        iso = dist.iso_url
    elif checksum is None:
        raise InputError(f"{dist.name}: give the checksum of {iso} (sha256:<hex> or a checksum file)")

    literal = _literal_checksum(checksum)
    # Where the checksum file is (a URL or a local path), used when the checksum is no literal digest.
    sums_source = checksum.removeprefix("file:").removeprefix("file://")

    if _is_url(iso):
        if literal:
            return iso, literal
        if _is_url(sums_source):
            return iso, f"file:{sums_source}"
        sums = Path(sums_source).expanduser()
        if not sums.is_file():
            raise InputError(f"checksum file {sums} does not exist")
        return iso, checksum_from_file(sums, Path(urlsplit(iso).path).name)

    path = Path(iso).expanduser().absolute()
    if not path.is_file():
        raise InputError(f"{dist.name}: ISO {path} does not exist")
    if literal is None:
        if _is_url(sums_source):
            return str(path), f"file:{sums_source}"
        sums = Path(sums_source).expanduser()
        if not sums.is_file():
            raise InputError(f"checksum file {sums} does not exist")
        literal = checksum_from_file(sums, path.name)
    algorithm, expected = literal.split(":", 1)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise InputError(
            f"checksum mismatch for {path}: expected {algorithm} {expected}, the file has {actual}"
        )
    return str(path), literal
