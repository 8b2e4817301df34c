"""`stage4 build` with builder = "packer": the installer run is bounded, and a failed install leaves
nothing behind. (No installer ISO is obtainable here, so the ISO is a stand-in file with a real
checksum: Packer verifies it, boots it, and the installer never answers on SSH.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.conftest import run_stage4


def test_packer_build_that_never_installs_fails_cleanly(tmp_path: Path) -> None:
    iso = tmp_path / "stand-in.iso"
    iso.write_bytes(os.urandom(16384))
    digest = hashlib.sha256(iso.read_bytes()).hexdigest()
    toml = tmp_path / "stage4.toml"
    toml.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{tmp_path}/cache"\n'
        '[machine]\naccelerator = "tcg"\nmemory = "1G"\n'
        f'[images.rocky]\ndistribution = "rocky-9"\nbuilder = "packer"\nfilesystem = "xfs"\n'
        f'identifier = "system"\niso = "{iso}"\niso_checksum = "sha256:{digest}"\n'
        'installer_timeout = "20s"\n',
        encoding="utf-8",
    )
    result = run_stage4("-c", str(toml), "build", timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stage4: error: ") and "packer" in last.lower(), last
    assert "Timeout waiting for SSH" in result.stderr or "timeout" in last.lower(), result.stderr[-2000:]
    assert not list((tmp_path / "out").rglob("*.qcow2"))
    leftover = subprocess.run(["pgrep", "-af", str(tmp_path)], capture_output=True, text=True).stdout
    assert "qemu-system" not in leftover, leftover


def test_packer_build_refuses_a_wrong_iso_checksum(tmp_path: Path) -> None:
    iso = tmp_path / "stand-in.iso"
    iso.write_bytes(os.urandom(4096))
    toml = tmp_path / "stage4.toml"
    toml.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{tmp_path}/cache"\n'
        f'[images.deb]\ndistribution = "debian-12"\nbuilder = "packer"\niso = "{iso}"\n'
        f'iso_checksum = "sha256:{"0" * 64}"\n',
        encoding="utf-8",
    )
    result = run_stage4("-c", str(toml), "build", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "checksum" in result.stderr.strip().splitlines()[-1].lower()
    assert not list((tmp_path / "out").rglob("*.qcow2"))
