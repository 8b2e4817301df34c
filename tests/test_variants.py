"""A non-default variant: xfs with the identifier 'system' (the convention of a real deployment)."""

from __future__ import annotations

import json
import subprocess

import pytest

from stage4 import api
from tests.conftest import BuiltImage

pytestmark = pytest.mark.slow


def test_xfs_system_image_carries_the_identifier_twice(xfs_image: BuiltImage, tmp_path) -> None:
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(xfs_image.path), str(raw)], check=True)
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]
    (root,) = [p for p in table["partitions"] if p.get("name") == "system"]
    probe = subprocess.run(
        ["blkid", "-p", "-o", "export", "-O", str(root["start"] * 512), str(raw)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tags = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert (tags["LABEL"], tags["TYPE"]) == ("system", "xfs")


def test_xfs_system_image_passes_inspect_and_boots(xfs_image: BuiltImage) -> None:
    report = api.inspect(xfs_image.path)
    assert report.passed, report.problems()
    assert report.identifier == "system"
    assert report.kernels
    result = api.boot(xfs_image.config, xfs_image.path, via="bootloader", timeout=400)
    assert f"STAGE4-USERSPACE-UP {result.marker}" in result.serial_log.read_text(errors="replace")
