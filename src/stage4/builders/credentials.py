"""Per-build credentials of the installer's build user: a random password (stored only as a SHA-512
crypt hash in the answer files) and an SSH key pair Packer logs in with.

Nothing fixed reaches an image: every render and every build makes new ones. The private key and the
password stay in the build's own `secrets/` directory (mode 0600).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from stage4.runner import Runner

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Which bytes of the final SHA-512 digest form each group of four output characters (the SHA-crypt spec).
_SHA512_ORDER = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)
_ROUNDS = 5000  # the default, which the hash then does not spell out


def _repeat(block: bytes, length: int) -> bytes:
    return (block * (length // len(block) + 1))[:length]


def sha512_crypt(password: str, salt: str) -> str:
    """The `$6$salt$hash` form of crypt(3), as `openssl passwd -6` and mkpasswd write it.

    Written out because Python's crypt module is deprecated (and gone in 3.13).
    """
    key = password.encode()
    salt_bytes = salt.encode()[:16]
    b = hashlib.sha512(key + salt_bytes + key).digest()
    a = hashlib.sha512(key + salt_bytes)
    a.update(_repeat(b, len(key)))
    length = len(key)
    while length:
        a.update(b if length & 1 else key)
        length >>= 1
    digest = a.digest()
    p_bytes = _repeat(hashlib.sha512(key * len(key)).digest(), len(key))
    s_bytes = _repeat(hashlib.sha512(salt_bytes * (16 + digest[0])).digest(), len(salt_bytes))
    for i in range(_ROUNDS):
        c = hashlib.sha512()
        c.update(p_bytes if i & 1 else digest)
        if i % 3:
            c.update(s_bytes)
        if i % 7:
            c.update(p_bytes)
        c.update(digest if i & 1 else p_bytes)
        digest = c.digest()
    out = []
    for first, second, third in _SHA512_ORDER:
        word = (digest[first] << 16) | (digest[second] << 8) | digest[third]
        for _ in range(4):
            out.append(_CRYPT_ALPHABET[word & 0x3F])
            word >>= 6
    word = digest[63]
    for _ in range(2):
        out.append(_CRYPT_ALPHABET[word & 0x3F])
        word >>= 6
    return f"$6${salt_bytes.decode()}${''.join(out)}"


def random_salt(length: int = 16) -> str:
    return "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class BuildCredentials:
    username: str
    password_hash: str
    ssh_public_key: str
    private_key_file: Path


def generate(secrets_dir: Path, runner: Runner, username: str = "packer") -> BuildCredentials:
    """Make a fresh password and ed25519 key pair in `secrets_dir` (created with mode 0700)."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(0o700)
    password = secrets.token_urlsafe(24)
    password_file = secrets_dir / "build-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    key = secrets_dir / "build_key"
    for old in (key, key.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    runner.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stage4-build", "-f", key],
        step="generate the build user's SSH key",
    )
    public_key = key.with_name(key.name + ".pub").read_text().strip()
    return BuildCredentials(username, sha512_crypt(password, random_salt()), public_key, key)
