"""`stage4 netboot --local-disk`: the disk given to the client (real sfdisk on a sparse file), the config
keys the guest gets, and how the layer the guest reports is checked (fast; the boot itself is in
tests/test_netboot.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stage4.boot import local_disk, netboot
from stage4.errors import InputError, StepFailed
from stage4.runner import Runner
from stage4.ui import Display

MODULE_LIB = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs/stage4-lib.sh"


@pytest.fixture
def runner() -> Runner:
    return Runner(Display())


def gpt_names(path: Path) -> list[str]:
    out = subprocess.run(["sfdisk", "--json", path], capture_output=True, text=True, check=True).stdout
    return [p.get("name", "") for p in json.loads(out)["partitiontable"]["partitions"]]


def test_a_new_sparse_disk_with_the_configured_partition(tmp_path: Path, runner: Runner) -> None:
    disk = local_disk.prepare("2G", "SCRATCH", False, tmp_path, runner)
    assert disk.path.stat().st_size == 2 << 30
    assert disk.path.stat().st_blocks * 512 < 4 << 20  # sparse
    assert gpt_names(disk.path) == ["SCRATCH"]
    # a file that has the partition is used as it is
    again = local_disk.prepare(str(disk.path), "SCRATCH", True, tmp_path / "x", runner)
    assert again.path == disk.path and again.persistent


def test_local_disk_errors_are_one_line(tmp_path: Path, runner: Runner) -> None:
    with pytest.raises(InputError, match=r"--local-disk 10M: at least 64M"):
        local_disk.prepare("10M", "OPENSLX_SYS", False, tmp_path, runner)
    with pytest.raises(
        InputError, match=r"--local-disk 8X: neither a size \(e\.g\. 8G\) nor a disk image file"
    ):
        local_disk.prepare("8X", "OPENSLX_SYS", False, tmp_path, runner)
    other = local_disk.prepare("64M", "OTHER", False, tmp_path, runner).path
    with pytest.raises(InputError, match=r"no GPT partition named OPENSLX_SYS \(partitions: OTHER\)"):
        local_disk.prepare(str(other), "OPENSLX_SYS", False, tmp_path, runner)
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(1 << 20))
    with pytest.raises(InputError, match=r"no GPT partition named OPENSLX_SYS \(partitions: none\)"):
        local_disk.prepare(str(blank), "OPENSLX_SYS", False, tmp_path, runner)
    qcow = tmp_path / "disk.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(InputError, match="a qcow2 file; give a raw disk image"):
        local_disk.prepare(str(qcow), "OPENSLX_SYS", False, tmp_path, runner)


def test_the_guest_config_names_the_disk() -> None:
    published = "SLX_DNBD3_SERVERS='10.0.0.1'\nSLX_WRITABLE_DEVICE_IDENTIFIER='SCRATCH'\nSLX_DNBD3_RID=3\n"
    assert local_disk.configured_identifier(published) == "SCRATCH"
    assert local_disk.configured_identifier("SLX_DNBD3_RID=3\n") == "OPENSLX_SYS"
    disk = local_disk.LocalDisk(Path("/x"), "SCRATCH", True)
    guest = netboot.guest_config(published, ["10.0.2.101"], local_disk.guest_keys(disk))
    assert guest.splitlines() == [
        "SLX_DNBD3_SERVERS=10.0.2.101",
        "SLX_WRITABLE_DEVICE_IDENTIFIER=SCRATCH",
        "SLX_DNBD3_RID=3",
        "SLX_WRITABLE_DEVICE_PERSISTENT=yes",
    ]
    out = subprocess.run(
        ["bash", "-c", f'. {MODULE_LIB}; slx_parse_config; echo "$SLX_WRITABLE_DEVICE_PERSISTENT"'],
        input=guest,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "yes\n"


THIN_ROOT = {
    "source": "/dev/mapper/root",
    "dm": "root",
    "slaves": "dm-3,xloop0p3",
    "xloop0": "/dev/dnbd0",
    "dnbd0": "stage4/debian-12.qcow2:3@10.0.2.101:5003",
}
DISK = {
    "layer": "disk",
    "device": "/dev/vda1",
    "kind": "thin-snapshot",
    "size": str(4283432960),
    "state": "fresh",
    "fs_bytes": str(4150000000),
    "fs_before": str(2600000000),
    "leaves": "vda1,xloop0p3",
    "stage3": "stage4-writable: /dev/mapper/root = thin-snapshot of /dev/xloop0p3 on /dev/vda1 (...)",
}
RAM = {
    **DISK,
    "layer": "ram",
    "device": "/dev/zram0",
    "kind": "snapshot",
    "fs_before": DISK["fs_bytes"],
    "leaves": "xloop0p3,zram0",
    "stage3": "stage4-writable: /dev/mapper/root = snapshot of /dev/xloop0p3 in RAM (/dev/zram0, 1 bytes): "
    "no partition named OPENSLX_SYS within 10 s",
}


def test_root_over_a_thin_pool_is_accepted() -> None:
    assert "(dm root: xloop0p3 + dm-3)" in netboot.check_root(THIN_ROOT, "stage4/debian-12.qcow2", 3)
    with pytest.raises(StepFailed, match="is not over an xloop partition and a RAM disk or thin pool"):
        netboot.check_root({**THIN_ROOT, "slaves": "xloop0p3,vda1"}, "stage4/debian-12.qcow2", 3)


def test_the_writable_layer_check() -> None:
    disk = local_disk.LocalDisk(Path("/x"), "OPENSLX_SYS", False)
    assert local_disk.check_writable(DISK, disk, 1) == (
        "writable layer: /dev/vda1, thin-snapshot, 4.0 GiB, fresh; / 3.9 GiB, grown from 2.4 GiB"
    )
    assert local_disk.check_writable(RAM, None, 1) == (
        "writable layer: RAM (/dev/zram0), snapshot, 4.0 GiB, fresh; "
        "no partition named OPENSLX_SYS within 10 s; / 3.9 GiB"
    )
    persistent = local_disk.LocalDisk(Path("/x"), "OPENSLX_SYS", True)
    assert "kept" in local_disk.check_writable({**DISK, "state": "kept"}, persistent, 2)
    bad = [
        ({}, disk, 1, "printed no STAGE4-WRITABLE line"),
        (RAM, disk, 1, "the layer is in RAM, not on the local disk: stage4-writable: .* within 10 s"),
        (DISK, None, 1, "without a local disk the layer is disk on /dev/vda1, not RAM"),
        ({**DISK, "leaves": "vdb1,xloop0p3"}, disk, 1, r"/ is not over /dev/vda1 \(leaves: vdb1,xloop0p3\)"),
        ({**DISK, "leaves": "vda1"}, disk, 1, "/ is not over an xloop partition"),
        (DISK, persistent, 2, r"boot 2: the layer on /dev/vda1 is fresh, not kept \(--persistent\)"),
        ({**DISK, "state": "kept"}, disk, 2, "boot 2: the layer on /dev/vda1 is kept, not fresh"),
    ]
    for facts, given, boot, message in bad:
        with pytest.raises(StepFailed, match=message):
            local_disk.check_writable(facts, given, boot)


def test_the_facts_are_read_from_the_serial_log(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text(
        "[    3.1] dnbd3: ok\n"
        "stage4-writable: /dev/mapper/root = thin-snapshot of /dev/xloop0p3 on /dev/vda1 (5 bytes, fresh)\n"
        "[   9.2] STAGE4-WRITABLE layer=disk device=/dev/vda1 kind=thin-snapshot size=5 state=fresh "
        "fs_bytes=4 fs_before=3 leaves=vda1,xloop0p3\n"
    )
    facts = local_disk.writable_facts(log)
    assert facts["layer"] == "disk" and facts["leaves"] == "vda1,xloop0p3" and facts["fs_before"] == "3"
    assert facts["stage3"].endswith("on /dev/vda1 (5 bytes, fresh)")


def test_cli_bad_combinations_are_one_line(tmp_path: Path) -> None:
    for args, message in [
        (
            ["--persistent"],
            "stage4: error: --persistent needs --local-disk (the layer is kept on the client's local disk)",
        ),
        (["--boots", "0"], "stage4: error: Invalid value for '--boots': 0 is not in the range 1<=x<=10."),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "stage4", "netboot", str(tmp_path), "stage4/x.qcow2", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [message]
