"""The text files of a revision: the stage-3 config fragment, the iPXE entry and the JSON record.

`config.r<RID>` (docs/client-boot.md) pins image and revision for stage 3; `<boot-dir>/config` is the
one a client fetches, so the revision it names is the active one. `ipxe.r<RID>` is the entry deployers put
in their boot menu (`slxsrv` and `slxbase` are set by that menu); it pins its revision on the kernel command
line. `<boot-dir>/ipxe`, written with `<boot-dir>/config` at activation, is the entry that follows the
active revision: the active revision's kernel and initramfs, and no revision on the command line, so
stage 3 takes it from `config`. `publication.r<RID>.json` in
`<store>/.stage4/<name>/` records what was published (sha256, sizes, build identity, boot directory).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from stage4.dnbd3.store import META_DIR
from stage4.errors import InputError

RECORD_FORMAT = "stage4-publication/1"
ACTIVE_CONFIG = "config"
ACTIVE_IPXE = "ipxe"
_ENTRY_KERNEL = re.compile(r"^kernel \S*/kernel\.r([0-9]+) ", re.MULTILINE)
_CONFIG_LINE = re.compile(r"^(SLX_DNBD3_IMAGE|SLX_DNBD3_RID)='([^']*)'\s*$", re.MULTILINE)


class FileFacts(TypedDict):
    size: int
    sha256: str


class BootFile(FileFacts):
    """A boot file of a revision (kernel, initrd): its name in the boot directory and where it came from."""

    file: str
    source: str


class RecordSource(TypedDict):
    """What was exported: the source image and the build it came from."""

    image: str
    size: int
    identity: str | None
    manifest: str | None
    dracut_modules: list[str]


class PublicationRecord(TypedDict):
    """`publication.r<RID>.json` as `record` writes it (records read back are plain JSON: `read_record`)."""

    format: str
    name: str
    rid: int | str
    file: str
    size: int
    sha256: str
    crc_file: str
    crc_sha256: str
    identifier: str
    servers: list[str]
    source: RecordSource
    boot_dir: str
    boot_files: dict[str, BootFile]
    config: str
    ipxe: str | None
    published_at: str
    build: dict[str, Any] | None  # the build manifest (JSON)


def config_fragment(
    servers: list[str],
    name: str,
    rid: int | str,
    identifier: str,
    comment: str,
    config_name: str | None = None,
) -> str:
    values = {
        "SLX_DNBD3_SERVERS": " ".join(servers),
        "SLX_DNBD3_IMAGE": name,
        "SLX_DNBD3_RID": str(rid),
        "SLX_SYSTEM_PARTITION_IDENTIFIER": identifier,
    }
    if config_name:
        values["SLX_CONFIG_NAME"] = config_name  # stage 3 unpacks <slxbase>/<this> into the new root
    lines = [f"# {comment}"]
    for key, value in values.items():
        if "'" in value:
            raise InputError(f"{key}: {value!r} contains a quote")
        lines.append(f"{key}='{value}'")
    return "\n".join(lines) + "\n"


def ipxe_entry(rid: int | str, comment: str) -> str:
    """The boot-menu entry of a revision: kernel and initramfs over HTTP from ${slxsrv}/${slxbase}; BOOTIF
    names the NIC iPXE booted from (stage 3 brings up that one)."""
    base = "http://${slxsrv}/${slxbase}"
    return (
        f"#!ipxe\n# {comment}\n"
        f"kernel {base}/kernel.r{rid} initrd=initrd.r{rid} slxsrv=${{slxsrv}} slxbase=${{slxbase}} "
        f"BOOTIF=01-${{mac:hexhyp}} SLX_DNBD3_RID={rid}\n"
        f"initrd {base}/initrd.r{rid}\n"
        "boot\n"
    )


def active_ipxe_entry(name: str, rid: int | str, comment: str) -> str:
    """`<boot-dir>/ipxe`: the active revision's kernel and initramfs (immutable, revision-numbered files, so
    the two always belong together), the revision left to `<boot-dir>/config`."""
    base = "http://${slxsrv}/${slxbase}"
    return (
        f"#!ipxe\n# stage4 active entry of {name}: kernel and initramfs of revision {rid}, the revision "
        f"from the config beside this entry (both replaced by the next activation); {comment}\n"
        f"kernel {base}/kernel.r{rid} initrd=initrd.r{rid} slxsrv=${{slxsrv}} slxbase=${{slxbase}}\n"
        f"initrd {base}/initrd.r{rid}\n"
        "boot\n"
    )


def comment(name: str, rid: int | str, sha256: str, identity: str | None) -> str:
    build = f", build {identity}" if identity else ""
    return f"stage4 export of {name} revision {rid}, sha256 {sha256}{build}"


def file_facts(path: Path) -> FileFacts:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def record(
    *,
    name: str,
    rid: int | str,
    size: int,
    sha256: str,
    crc_file: bytes,
    identifier: str,
    servers: list[str],
    source: RecordSource,
    boot_dir: str,
    boot_files: dict[str, BootFile],
    ipxe: bool,
    build: dict[str, Any] | None = None,
) -> PublicationRecord:
    return {
        "format": RECORD_FORMAT,
        "name": name,
        "rid": rid,
        "file": f"{name}.r{rid}",
        "size": size,
        "sha256": sha256,
        "crc_file": f"{name}.r{rid}.crc",
        "crc_sha256": hashlib.sha256(crc_file).hexdigest(),
        "identifier": identifier,
        "servers": servers,
        "source": source,
        "boot_dir": boot_dir,
        "boot_files": boot_files,
        "config": f"config.r{rid}",
        "ipxe": f"ipxe.r{rid}" if ipxe else None,
        "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        # The build manifest itself: the next build of the image overwrites prod.json, and `stage4 diff`
        # of two revisions needs both.
        "build": build,
    }


def recorded_boot_dir(store: str, boot_dir: str) -> str:
    """How a record names the boot directory: relative to the store when inside it (so that a record
    stays right wherever the store is mounted), else absolute. Both paths absolute, normalised."""
    relative = posixpath.relpath(boot_dir, store)
    return boot_dir if relative == ".." or relative.startswith("../") else relative


def boot_dir_of(store: Path, record: Mapping[str, Any]) -> Path | None:
    value = record.get("boot_dir")
    return Path(store) / value if isinstance(value, str) and value else None


def record_path(store: Path, name: str, rid: int) -> Path:
    return Path(store) / META_DIR / name / f"publication.r{rid}.json"


def read_record(store: Path, name: str, rid: int) -> dict[str, Any] | None:
    """The record of revision `rid` as JSON (any format version), or None if unreadable or not that rid."""
    try:
        data = json.loads(record_path(store, name, rid).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("rid") == rid else None


def boot_files_of(record: Mapping[str, Any], rid: int) -> list[str]:
    """The boot-directory files a record says its revision has."""
    names = [f"{kind}.r{rid}" for kind in (record.get("boot_files") or {})]
    names.append(record.get("config") or f"config.r{rid}")
    if record.get("ipxe"):
        names.append(record["ipxe"])
    return names


def active_rid(boot_dir: Path, name: str) -> int | None:
    """The revision `<boot-dir>/config` rolls clients out to, if it is one of `name`'s."""
    try:
        text = (Path(boot_dir) / ACTIVE_CONFIG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    values = dict(_CONFIG_LINE.findall(text))
    rid = values.get("SLX_DNBD3_RID", "")
    return int(rid) if values.get("SLX_DNBD3_IMAGE") == name and rid.isdigit() else None


def active_entry_rid(boot_dir: Path, name: str) -> int | None:
    """The revision whose kernel `<boot-dir>/ipxe` boots, if that entry is `name`'s active entry."""
    try:
        text = (Path(boot_dir) / ACTIVE_IPXE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if f"# stage4 active entry of {name}:" not in text:
        return None
    found = _ENTRY_KERNEL.search(text)
    return int(found[1]) if found else None
