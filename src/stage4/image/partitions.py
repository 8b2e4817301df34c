"""An image's partitions and filesystem labels, read by sfdisk and blkid (not by stage4's disk writer).

A qcow2 (with its whole backing chain) is first seen as raw through `qemu-img convert` into a sparse
temporary file (`raw_view`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stage4.image import qcow2
from stage4.runner import Runner


@dataclass(frozen=True)
class PartitionInfo:
    number: int
    name: str
    type_guid: str
    offset: int
    size: int
    fs_type: str | None
    fs_label: str | None


@contextlib.contextmanager
def raw_view(image: Path, runner: Runner) -> Iterator[Path]:
    """The image as a raw disk: the file itself if it is raw, else a sparse temporary conversion."""
    if not qcow2.is_qcow2(image):
        yield image
        return
    with tempfile.TemporaryDirectory(prefix="stage4-raw-") as tmp:
        raw = Path(tmp) / "disk.raw"
        runner.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw], step="read image")
        yield raw


def partitions(raw: Path, runner: Runner) -> tuple[str | None, list[PartitionInfo]]:
    """The partition table type and its partitions, read by sfdisk and blkid (not by stage4's writer)."""
    result = runner.run(["sfdisk", "--json", raw], step="read partition table", capture=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None, []
    table = json.loads(result.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    found = []
    for number, entry in enumerate(table.get("partitions", []), start=1):
        offset, size = entry["start"] * sector, entry["size"] * sector
        probe = runner.run(
            ["blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), raw],
            step="read filesystem label",
            capture=True,
            check=False,
        )
        tags = dict(line.split("=", 1) for line in probe.stdout.splitlines() if "=" in line)
        found.append(
            PartitionInfo(
                number,
                entry.get("name", ""),
                entry.get("type", ""),
                offset,
                size,
                tags.get("TYPE"),
                tags.get("LABEL"),
            )
        )
    return table.get("label"), found


def root_partition(parts: list[PartitionInfo], identifier: str) -> PartitionInfo | None:
    return next((p for p in parts if p.name == identifier), None)
