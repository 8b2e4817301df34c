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
