"""Reading built images and the host back, for the tests: files of an image's root filesystem, dpkg's
status, and what is still attached (loop devices, mounts, processes). Debugfs, sfdisk and qemu-img are
tools stage4 did not write; `read_files` and `listing` use stage4's own reader where a test checks a
layer's content rather than the reader.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from stage4.fsutil import mounts_below
from stage4.image.filesystem import FilesystemReader
from stage4.image.partitions import partitions, raw_view, root_partition
from stage4.runner import Runner


def read_files(image: Path, *paths: str) -> dict[str, str | None]:
    """Contents of files in the image's root filesystem, read with debugfs; None where the file's folder
    does not list it (any other failure to read is an error, never taken for absence)."""
    runner = Runner()
    found: dict[str, str | None] = {}
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        with FilesystemReader(raw, root_partition(parts, "SLX_SYS"), runner) as reader:
            for path in paths:
                folder, name = path.rsplit("/", 1)
                if name not in reader.list_dir(folder or "/"):
                    found[path] = None
                    continue
                dest = raw.parent / "out"
                dest.unlink(missing_ok=True)
                reader.copy_out(path, dest)
                found[path] = dest.read_text(errors="replace")
    return found


def listing(image: Path, directory: str) -> list[str]:
    """The names in a folder of the image's root filesystem (stage4's own reader)."""
    runner = Runner()
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        with FilesystemReader(raw, root_partition(parts, "SLX_SYS"), runner) as reader:
            return reader.list_dir(directory)


def installed(dpkg_status: str, package: str) -> bool:
    """Whether dpkg's status file says `package` is installed."""
    for stanza in dpkg_status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace()
        )
        if fields.get("Package") == package:
            return fields.get("Status", "").endswith(" installed")
    return False


def attached_to(path: Path) -> list[str]:
    """Loop devices, qemu and Ansible processes and mounts that mention or live in `path`."""
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True, text=True
    ).stdout
    procs = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = [line for line in loops.splitlines() if str(path) in line]
    found += [
        line for line in procs.splitlines() if str(path) in line and ("qemu" in line or "ansible" in line)
    ]
    found += mounts_below(path)
    return found


def root_offset(image: Path, raw: Path) -> int:
    """Converts `image` to `raw` with qemu-img; the byte offset of its SLX_SYS partition, by sfdisk."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]
    (root,) = [p for p in table["partitions"] if p.get("name") == "SLX_SYS"]
    return root["start"] * table.get("sectorsize", 512)


class Debugfs:
    """debugfs on a raw copy of the image's root partition (a tool stage4 did not write)."""

    def __init__(self, image: Path, tmp: Path):
        self.raw = tmp / f"{image.stem}.raw"
        self.target = f"{self.raw}?offset={root_offset(image, self.raw)}"

    def run(self, command: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", command, self.target], check=True, capture_output=True, text=True
        ).stdout

    def stat(self, path: str) -> dict | None:
        """Type and mode of `path` (not following a symlink at its end); None if absent."""
        out = self.run(f"stat {path}")
        if "Type:" not in out:
            return None
        words = out.split()
        return {"type": words[words.index("Type:") + 1], "mode": words[words.index("Mode:") + 1]}

    def cat(self, path: str) -> str:
        return self.run(f"cat {path}")

    def names(self, folder: str) -> list[str]:
        lines = self.run(f"ls -p {folder}").splitlines()
        return sorted(
            n for n in (line.split("/")[5] for line in lines if line.count("/") >= 6) if n not in (".", "..")
        )


def dpkg_stanza(status: str, package: str) -> dict:
    """The fields of `package` in dpkg's status file ({} if it is not there)."""
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace()
        )
        if fields.get("Package") == package:
            return fields
    return {}


# The VGA screen's preferred mode (EDID) stage4 gives a screenshot boot.
SCREEN = (1024, 768)


def check_screenshot(shot: Path) -> None:
    """A greeter's screenshot: a PNG of the screen's size with a drawn picture (read with Pillow)."""
    with Image.open(shot) as picture:
        assert picture.format == "PNG"
        assert picture.size == SCREEN
        found = picture.convert("RGB").getcolors(maxcolors=1 << 24)
    # A text console has at most 16 colours, an X screen with only its pointer some 80 on 0.03 % of it;
    # a greeter (panel, login box, anti-aliased text) has hundreds, on more than 0.5 % of the screen
    # (GDM's flat dark one 1.2 %, LightDM's 11 %).
    assert found is not None and len(found) >= 64, len(found or ())
    assert max(count for count, _ in found) <= 0.995 * SCREEN[0] * SCREEN[1]
