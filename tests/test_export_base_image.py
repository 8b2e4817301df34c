"""Export a real stage4-built image (the lead's `base_image` fixture) and verify it over DNBD3."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stage4.dnbd3.server import DevServer
from stage4.dnbd3.verify import verify
from tests import sshd_server
from tests.conftest import run_stage4

ROOT = Path(__file__).resolve().parents[1]
sshd = sshd_server.sshd  # the fixture


@pytest.mark.slow
def test_export_and_verify_a_built_image(base_image, tmp_path, sshd):
    store = tmp_path / "store"
    store.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage4",
            "export",
            str(base_image.path),
            "--store",
            str(store),
            "--name",
            "stage4/debian-12.qcow2",
            "--server",
            "10.0.0.1",
            "--server",
            "10.0.0.2",
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    publication = json.loads(result.stdout[result.stdout.index("{") :])
    assert publication["rid"] == 1 and publication["identifier"] == base_image.identifier
    assert publication["source_identity"] == base_image.manifest["identity"]
    meta = store / ".stage4/stage4/debian-12.qcow2"
    assert (meta / "kernel.r1").stat().st_size > 1_000_000 and (meta / "initrd.r1").stat().st_size > 1_000_000
    config = (meta / "config.r1").read_text()
    assert "SLX_DNBD3_SERVERS='10.0.0.1 10.0.0.2'" in config
    assert f"SLX_SYSTEM_PARTITION_IDENTIFIER='{base_image.identifier}'" in config
    # The base's initramfs lacks the dracut module a layered build configures: as a dev-run manifest would
    # name it, the export is refused before anything is written.
    manifest = tmp_path / "prod.json"
    manifest.write_text(
        json.dumps(
            {
                "kind": "prod",
                "identity": "x",
                "identifier": base_image.identifier,
                "dracut_modules": ["dnbd3-rootfs"],
                "kernel": str(meta / "kernel.r1"),
                "initramfs": str(meta / "initrd.r1"),
                "kernel_version": "unknown",
            }
        )
    )
    before = sorted(store.rglob("*"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage4",
            "export",
            str(base_image.path),
            "--store",
            str(store),
            "--name",
            "stage4/debian-12.qcow2",
            "--manifest",
            str(manifest),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    refusal = f"initramfs {meta / 'initrd.r1'} lacks the configured dracut module 'dnbd3-rootfs'"
    assert refusal in result.stderr
    assert sorted(store.rglob("*")) == before

    with DevServer(store) as server:
        host, port = server.address
        report = verify(f"{host}:{port}", "stage4/debian-12.qcow2", store=store, timeout=30)
    assert report.passed, report.problems
    assert any(f"'{base_image.identifier}'" in fact and "filesystem ext4" in fact for fact in report.facts)

    # The same export through SSH (the CLI with --ssh-option) gives the same files, byte for byte.
    remote = tmp_path / "remote"
    remote.mkdir()
    options = [arg for option in sshd.options for arg in ("--ssh-option", option)]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage4",
            "export",
            str(base_image.path),
            "--store",
            f"{sshd.host}:{remote}",
            *options,
            "--name",
            "stage4/debian-12.qcow2",
            "--server",
            "10.0.0.1",
            "--server",
            "10.0.0.2",
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout[result.stdout.index("{") :])["rid"] == 1
    for name in (
        "stage4/debian-12.qcow2.r1",
        "stage4/debian-12.qcow2.r1.crc",
        ".stage4/stage4/debian-12.qcow2/kernel.r1",
        ".stage4/stage4/debian-12.qcow2/initrd.r1",
        ".stage4/stage4/debian-12.qcow2/config.r1",
    ):
        assert filecmp.cmp(store / name, remote / name, shallow=False), name


@pytest.mark.slow
def test_a_client_of_the_base_s_own_initrd_is_warned_of_and_stops_at_once(base_image, tmp_path):
    """A base exported alone publishes its /boot initramfs, which has no stage 3: export says so, and a
    netboot of it fails as soon as the guest gives up (dracut's emergency shell), not at the timeout."""
    store = tmp_path / "store"
    store.mkdir()
    project = tmp_path / "stage4.toml"
    project.write_text(
        f'[machine]\ncpus = 1\n\n[build]\noutput_dir = "{tmp_path / "output"}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'
    )

    def stage4(*args: object, timeout: float) -> subprocess.CompletedProcess:
        return run_stage4("-c", str(project), *map(str, args), cwd=ROOT, timeout=timeout)

    name = "stage4/base-alone.qcow2"
    result = stage4(
        "export",
        base_image.path,
        "--store",
        store,
        "--name",
        name,
        "--server",
        "10.0.0.1",
        "--json",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    publication = json.loads(result.stdout[result.stdout.index("{") :])
    [warning] = publication["warnings"]
    assert "has no dnbd3-rootfs dracut module: a Stage4 client cannot boot this revision" in warning
    assert f"{base_image.path.resolve()}: /boot/initrd.img-" in warning

    # Without the emergency-shell check this waits out the 300 s and names the missing marker instead.
    result = stage4("netboot", store, name, "--timeout", 300, "--log", tmp_path / "serial.log", timeout=600)
    assert result.returncode != 0
    assert "boot failed: the guest entered an emergency shell after initrd-switch-root.service failed" in (
        result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
