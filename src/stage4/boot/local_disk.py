"""`stage4 netboot --local-disk`: the client's local disk that stage 3 puts the writable layer on.

A new sparse file with a GPT whose one partition is named like the configured writable identifier
(SLX_WRITABLE_DEVICE_IDENTIFIER, default OPENSLX_SYS), made by sfdisk on the file, or a raw disk image
given by the user that has such a partition. The guest sees it as /dev/vda. What the layer became is read
back from the guest: stage 3 prints one `stage4-writable: ...` console line, and the runtime unit it leaves
for stage 4 prints `STAGE4-WRITABLE layer=disk|ram device= kind= size= state= fs_bytes= leaves=`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stage4.errors import InputError, StepFailed
from stage4.runner import Runner

DEFAULT_IDENTIFIER = "OPENSLX_SYS"
SIZE = re.compile(r"^(?P<n>[0-9]{1,9})(?P<unit>[MGT])$", re.IGNORECASE)
UNITS = {"M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_SIZE = 64 << 20
WRITABLE_FACTS = re.compile(r"STAGE4-WRITABLE (?P<facts>.*)$")
STAGE3_LINE = re.compile(r"(?P<line>stage4-writable: .*)$")


@dataclass
class LocalDisk:
    path: Path
    identifier: str
    persistent: bool


@dataclass
class DiskRequest:
    """What `--local-disk SIZE|FILE [--persistent]` asked for."""

    spec: str
    persistent: bool = False


def configured_identifier(config_text: str) -> str:
    """SLX_WRITABLE_DEVICE_IDENTIFIER of the published config (quotes removed), else the default."""
    found = None
    for line in config_text.splitlines():
        match = re.match(r"^\s*(?:export\s+)?SLX_WRITABLE_DEVICE_IDENTIFIER=(.*)$", line)
        if match:
            found = match[1].split("#", 1)[0].strip().strip("'\"")
    return found or DEFAULT_IDENTIFIER


def prepare(spec: str, identifier: str, persistent: bool, work: Path, runner: Runner) -> LocalDisk:
    """SIZE (N followed by M, G or T): a new sparse disk in `work`; else a raw disk image file to use."""
    size = SIZE.match(spec)
    if size:
        nbytes = int(size["n"]) * UNITS[size["unit"].upper()]
        if nbytes < MIN_SIZE:
            raise InputError(f"--local-disk {spec}: at least 64M")
        path = work / "local-disk.raw"
        with path.open("wb") as handle:
            handle.truncate(nbytes)
        script = f"label: gpt\nname={identifier}, type=linux\n"
        runner.run(["sfdisk", "-q", path], step="partition the local disk", input=script.encode())
        return LocalDisk(path, identifier, persistent)
    path = Path(spec).absolute()
    if not path.is_file():
        raise InputError(f"--local-disk {spec}: neither a size (e.g. 8G) nor a disk image file")
    with path.open("rb") as handle:
        if handle.read(4) == b"QFI\xfb":
            raise InputError(f"--local-disk {spec}: a qcow2 file; give a raw disk image")
    listing = runner.run(["sfdisk", "--json", path], step="read the local disk", capture=True, check=False)
    names = []
    if listing.returncode == 0:
        table = json.loads(listing.stdout or "{}").get("partitiontable", {})
        names = (
            [str(p.get("name", "")) for p in table.get("partitions", [])]
            if table.get("label") == "gpt"
            else []
        )
    if identifier not in names:
        raise InputError(
            f"--local-disk {spec}: no GPT partition named {identifier} "
            f"(partitions: {', '.join(n or '(unnamed)' for n in names) or 'none'})"
        )
    return LocalDisk(path, identifier, persistent)


def guest_keys(disk: LocalDisk) -> dict[str, str]:
    """The config keys the guest gets for the disk."""
    return {
        "SLX_WRITABLE_DEVICE_IDENTIFIER": disk.identifier,
        "SLX_WRITABLE_DEVICE_PERSISTENT": "yes" if disk.persistent else "no",
    }


def writable_facts(serial_log: Path) -> dict[str, str]:
    """The STAGE4-WRITABLE facts and the stage-3 line (as `stage3`) of one boot."""
    facts: dict[str, str] = {}
    for line in serial_log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = WRITABLE_FACTS.search(line)
        if match:
            for word in match["facts"].split():
                key, _, value = word.partition("=")
                facts[key] = value
        stage3 = STAGE3_LINE.search(line)
        if stage3 and " = " in line:
            facts["stage3"] = stage3["line"].strip()
    return facts


def _gib(value: str) -> str:
    try:
        return f"{int(value) / (1 << 30):.1f} GiB"
    except ValueError:
        return value


def check_writable(facts: dict[str, str], disk: LocalDisk | None, boot: int) -> str:
    """One sentence on the layer, or StepFailed saying how it is not what this boot should have."""
    origin = [leaf for leaf in facts.get("leaves", "").split(",") if re.match(r"^xloop\d+p\d+$", leaf)]
    problem = None
    if "layer" not in facts:
        problem = "the guest printed no STAGE4-WRITABLE line (its initramfs predates the writable layer)"
    elif not origin:
        problem = f"/ is not over an xloop partition (leaves: {facts.get('leaves') or 'none'})"
    elif disk is None and facts["layer"] != "ram":
        problem = f"without a local disk the layer is {facts['layer']} on {facts.get('device')}, not RAM"
    elif disk is not None and facts["layer"] != "disk":
        problem = f"the layer is in RAM, not on the local disk: {facts.get('stage3', 'no stage-3 line')}"
    elif facts.get("device", "?").removeprefix("/dev/") not in facts.get("leaves", "").split(","):
        problem = f"/ is not over {facts.get('device')} (leaves: {facts.get('leaves')})"
    elif disk is not None and boot > 1 and facts.get("state") != ("kept" if disk.persistent else "fresh"):
        want = "kept (--persistent)" if disk.persistent else "fresh"
        problem = f"boot {boot}: the layer on {facts.get('device')} is {facts.get('state')}, not {want}"
    if problem:
        raise StepFailed("netboot check", problem)
    grown = ""
    if facts.get("fs_before") and facts.get("fs_bytes") and facts["fs_before"] != facts["fs_bytes"]:
        grown = f", grown from {_gib(facts['fs_before'])}"
    where = facts["device"] if facts["layer"] == "disk" else f"RAM ({facts['device']})"
    why = ""
    if facts["layer"] == "ram" and "): " in facts.get("stage3", ""):
        why = f"; {facts['stage3'].rsplit('): ', 1)[1]}"
    return (
        f"writable layer: {where}, {facts.get('kind')}, {_gib(facts.get('size', '?'))}, {facts.get('state')}"
        f"{why}; / {_gib(facts.get('fs_bytes', '?'))}{grown}"
    )
