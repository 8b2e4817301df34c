"""What a layer's chroot gets while Ansible runs in it, and that none of it stays (provisioning/attach.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stage4.fsutil import mounts_below
from stage4.provisioning import attach
from stage4.runner import Runner


def test_chroot_gets_build_settings_that_leave_with_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting /proc, /sys and /dev into a chroot needs root")
    root = tmp_path / "root"
    for folder in ("etc/dpkg/dpkg.cfg.d", "usr/sbin"):
        (root / folder).mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    with attach.chroot_ready(root, Runner()):
        # dpkg reads every file of dpkg.cfg.d: no fsync per unpacked file while the layer is built.
        assert (root / attach.DPKG_UNSAFE_IO).read_text() == "force-unsafe-io\n"
        policy = subprocess.run([root / "usr/sbin/policy-rc.d"], check=False)
        assert policy.returncode == 101  # invoke-rc.d: no service starts
        assert (root / "etc/resolv.conf").read_bytes() == Path("/etc/resolv.conf").read_bytes()
        assert str((root / "proc").resolve()) in mounts_below(root)
    assert not (root / attach.DPKG_UNSAFE_IO).exists()
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert (root / "etc/resolv.conf").read_text() == "nameserver 192.0.2.1\n"
    assert mounts_below(root) == []
    # An image without dpkg gets no dpkg setting.
    bare = tmp_path / "bare"
    (bare / "etc").mkdir(parents=True)
    with attach.chroot_ready(bare, Runner()):
        assert not (bare / "etc/dpkg").exists()
    assert mounts_below(bare) == []


def test_writable_attach_keeps_every_write(tmp_path: Path) -> None:
    """The writable FUSE export ignores flushes and the layer file is synced once at the end: what was
    written while attached must all be in the layer, and the qcow2 consistent (checked by qemu-img and
    read back by debugfs, neither of which wrote it)."""
    if (why := attach.chroot_unavailable()) is not None:
        pytest.skip(why)
    size = 64 << 20
    fs, base, layer = tmp_path / "fs.raw", tmp_path / "base.qcow2", tmp_path / "layer.qcow2"
    with fs.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "SLX_SYS", fs], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", fs, base], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, layer], check=True)
    data = os.urandom(24 << 20)
    part = attach.RootPartition(offset=0, size=size, fs_type="ext4")
    with attach.attached(layer, part, tmp_path / "attach", Runner(), writable=True) as root:
        (root / "data").write_bytes(data)
        os.sync()  # a flush the export ignores
        (root / "after-sync").write_text("written after the flush\n")
    assert mounts_below(tmp_path) == []
    subprocess.run(["qemu-img", "check", "-q", layer], check=True)
    raw = tmp_path / "layer.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", layer, raw], check=True)

    def read_back(name: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat /{name}", raw], capture_output=True, check=True).stdout

    assert read_back("data") == data
    assert read_back("after-sync") == b"written after the flush\n"
