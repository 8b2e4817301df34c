"""What every installer-driven release shares: the inputs of an answer file and how templates are rendered.

A family module (apt.py for d-i preseed, ubuntu.py for autoinstall, rhel.py for kickstart) turns an
AnswerContext into the files Packer serves over HTTP, and names the boot command that points the
installer at them. The answer files never hold a fixed password: the build user's password hash and
SSH public key are generated per build (stage4.builders.credentials) and passed in here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import jinja2

from stage4.errors import InputError

# The build user Packer logs in as (key-only SSH, passwordless sudo). Provisioning removes it from
# published layers.
BUILD_USER = "packer"
HOSTNAME = "stage4"
# Packer's qemu builder attaches the disk as virtio, so the installer sees it as /dev/vda.
DISK = "/dev/vda"
# Every layout puts the root partition second: 1 = BIOS boot (or the EFI system partition), 2 = root.
ROOT_PARTITION = 2

SSH_PUBLIC_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [A-Za-z0-9@._-]+)?$"
)
SHA512_CRYPT_RE = re.compile(r"^\$6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$")
PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*$")

# The package that carries each filesystem's tools (the same name on apt- and rpm-based releases).
FILESYSTEM_TOOLS = {"ext4": "e2fsprogs", "btrfs": "btrfs-progs", "xfs": "xfsprogs"}


@dataclass(frozen=True)
class AnswerContext:
    """Everything an answer file depends on besides the release itself."""

    identifier: str
    filesystem: str
    password_hash: str
    ssh_public_key: str
    efi: bool = False
    packages: tuple[str, ...] = ()
    mirror: str | None = None
    username: str = BUILD_USER
    hostname: str = HOSTNAME
    disk: str = DISK
    root_partition: int = field(default=ROOT_PARTITION, init=False)

    def __post_init__(self) -> None:
        # Everything below ends up inside shell commands and installer syntax: accept only safe shapes.
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,36}", self.identifier):
            raise InputError(f"identifier {self.identifier!r}: only letters, digits, '_', '.', '-' (1-36)")
        if not SHA512_CRYPT_RE.match(self.password_hash):
            raise InputError("the build user's password must be given as a SHA-512 crypt hash ($6$...)")
        if not SSH_PUBLIC_KEY_RE.match(self.ssh_public_key.strip()):
            raise InputError("the build user's SSH public key is not a single OpenSSH public key line")
        for name in self.packages:
            if not PACKAGE_RE.match(name):
                raise InputError(f"{name!r} is not a package name")
        if self.mirror is not None and urlsplit(self.mirror).scheme not in ("http", "https"):
            raise InputError(f"mirror {self.mirror!r}: an installer needs an http:// or https:// mirror")

    @property
    def public_key(self) -> str:
        return self.ssh_public_key.strip()


_ENV: jinja2.Environment | None = None


def render(template: str, **values: object) -> str:
    """Render an answer-file template from distributions/templates (undefined names are errors)."""
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.PackageLoader("stage4.distributions", "templates"),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )
    return _ENV.get_template(template).render(**values)


def unique(items: list[str] | tuple[str, ...]) -> list[str]:
    """The items in order, without repeats (package lists are built from several sources)."""
    return list(dict.fromkeys(item for item in items if item))
