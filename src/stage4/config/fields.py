"""Value types and checks of the project file that the models share: sizes, identifiers, package names,
paths relative to the file, and the base model every table derives from."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, overload

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

DEFAULT_CONFIG_FILE = "stage4.toml"
DEFAULT_IMAGE = "debian-12"

# Filesystem label limits in bytes (ext4: s_volume_name[16]; xfs: sb_fname[12]; btrfs: BTRFS_LABEL_SIZE-1).
LABEL_LIMITS = {"ext4": 16, "xfs": 12, "btrfs": 255}
# A GPT partition name is 36 UTF-16 code units; the identifier is ASCII, so 36 characters.
GPT_NAME_LIMIT = 36
# Conservative: the identifier ends up in kernel command lines, fstab, shell config and udev link names
# (/dev/disk/by-partlabel/ID, which systemd turns into a unit name); udev escapes none of these characters.
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# The largest virtual size of a qcow2 image with qemu-img's default 64 KiB clusters.
QCOW2_MAX_SIZE = 2 << 50


def parse_size(value: object) -> int:
    """'4G', '512M', '2GiB' or a plain number of bytes; units are binary (as in qemu-img)."""
    if isinstance(value, bool):
        raise PydanticCustomError("size", "expected a size such as '4G' or '512M'")
    if isinstance(value, int):
        return value
    match = SIZE_RE.match(str(value))
    if not match:
        raise PydanticCustomError("size", "expected a size such as '4G' or '512M'")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """The shortest exact form parse_size reads back: 4294967296 -> '4G'."""
    for unit in ("P", "T", "G", "M", "K"):
        if size and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return str(size)


def identifier_problem(value: str, filesystem: str | None = None) -> str | None:
    """Why `value` cannot be a root partition identifier, or None.

    It must suit every consumer: the GPT name, the filesystem label, udev's /dev/disk/by-partlabel/ link,
    systemd's unit name made from that path (fstab, root=PARTLABEL=) and the kernel command line.
    """
    if not value:
        return "must not be empty"
    if not value.isascii():
        return "must be ASCII (it is a GPT name and a filesystem label)"
    if not IDENTIFIER_RE.match(value):
        return "may contain only letters, digits, '_', '.' and '-' (no whitespace or '/')"
    if value in (".", ".."):
        return (
            "is not a name: /dev/disk/by-partlabel/.. is a directory, and systemd cannot make a unit name "
            "from that path (the image would not boot)"
        )
    if value.startswith("."):
        return "must not start with '.' (a hidden by-partlabel link that systemd escapes in unit names)"
    if value.startswith("-"):
        return "must not start with '-' (command-line tools would take it for an option)"
    if len(value) > GPT_NAME_LIMIT:
        return f"longer than the {GPT_NAME_LIMIT} characters of a GPT partition name"
    if filesystem is not None and len(value) > LABEL_LIMITS[filesystem]:
        return f"longer than the {LABEL_LIMITS[filesystem]} bytes of a {filesystem} label"
    return None


def _package_name(name: str) -> str:
    if not PACKAGE_RE.match(name):
        raise PydanticCustomError("package", "not a package name")
    return name


PackageName = Annotated[str, AfterValidator(_package_name)]


class Accelerator(StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class Filesystem(StrEnum):
    ext4 = "ext4"
    btrfs = "btrfs"
    xfs = "xfs"


class BuilderKind(StrEnum):
    bootstrap = "bootstrap"
    packer = "packer"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def directory_problem(path: Path) -> str | None:
    """Why stage4 cannot make or use `path` as a directory (a file in the way), or None."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is a file, not a directory"
    return None


class Way(StrEnum):
    chroot = "chroot"
    vm = "vm"
    packer = "packer"


def missing_problem(path: Path, kind: str) -> str:
    """Why `path` is not the existing file or directory the config names."""
    if not path.exists():
        return f"no such {kind} {path}"
    return f"{path} is a {'file' if kind == 'directory' else 'directory'}, not a {kind}"


@overload
def relative_to_config(value: Path, info: ValidationInfo | None) -> Path: ...
@overload
def relative_to_config(value: None, info: ValidationInfo | None) -> None: ...
@overload
def relative_to_config(value: Path | None, info: ValidationInfo | None) -> Path | None: ...
def relative_to_config(value: Path | None, info: ValidationInfo | None) -> Path | None:
    """Relative paths in the project file are relative to the file's directory."""
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir") if info is not None else None
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _existing_playbook(value: Path, info: ValidationInfo) -> Path:
    value = relative_to_config(value, info)
    if not value.is_file():
        raise PydanticCustomError("playbook", "{what}", {"what": missing_problem(value, "file")})
    return value


Playbook = Annotated[Path, AfterValidator(_existing_playbook)]


# The root partition's GPT name and filesystem label where nothing else is said (the OpenSLX convention).
DEFAULT_IDENTIFIER = "SLX_SYS"
