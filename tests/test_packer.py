"""Running Packer on a rendered tree: the original invocation on Packer 1.6.x, the build wrapper's checks
(-only typos, checksums, no qcow2 = no success), the qemu-img -F wrapper, and an end-to-end installer
build when an ISO is given (STAGE4_TEST_ISO_<DISTRO> and STAGE4_TEST_ISO_<DISTRO>_SHA256).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from stage4 import distributions
from stage4.builders import packer as packer_mod
from stage4.builders import packer_run
from stage4.builders.packer import RenderTarget, render_tree
from stage4.builders.packer_run import build_base_with_packer, run_packer_build
from stage4.config import ImageConfig, MachineConfig
from stage4.errors import InputError, StepFailed
from stage4.runner import Runner
from stage4.ui import BuildLog, Display

pytestmark = pytest.mark.skipif(
    shutil.which("packer") is None, reason="packer is not installed (apt: packer)"
)
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="qemu is not installed",
)


def _runner(log: Path) -> Runner:
    return Runner(Display(console=Console(file=io.StringIO()), log=BuildLog(log)))


def _fake_iso(folder: Path) -> tuple[Path, str]:
    folder.mkdir(parents=True, exist_ok=True)
    iso = folder / "installer.iso"
    iso.write_bytes(os.urandom(8192))
    return iso, hashlib.sha256(iso.read_bytes()).hexdigest()


def _render_local(
    tree: Path, name: str, iso: Path, digest: str, **machine: object
) -> packer_mod.RenderedTemplate:
    target = RenderTarget(
        ImageConfig(distribution=name, identifier="system"), iso=str(iso), iso_checksum=digest
    )
    [template] = render_tree(
        tree, [target], MachineConfig(**{"memory": "512M", "cpus": 1, **machine}), Runner(), ssh_timeout="20s"
    )
    return template


def _qemu_processes(marker: str) -> list[str]:
    result = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "qemu-system" in line]


def test_packer_version_selects_the_template_format(tmp_path: Path) -> None:
    version = packer_run.packer_version(Runner(), env={"CHECKPOINT_DISABLE": "1"})
    shown = subprocess.run(
        ["packer", "version"], capture_output=True, text=True, env={**os.environ, "CHECKPOINT_DISABLE": "1"}
    ).stdout
    assert f"v{version[0]}.{version[1]}.{version[2]}" in shown
    iso = tmp_path / "fake.iso"
    iso.write_bytes(b"not an installer")
    template = _render_local(
        tmp_path / "tree", "rocky-9", iso, "sha256:" + hashlib.sha256(b"not an installer").hexdigest()
    )
    # Debian's 1.6.6 and anything before 1.7 get the legacy JSON template (the original invocation) ...
    for old in ((1, 6, 6), (1, 6, 0), version if version < (1, 7, 0) else (1, 5, 0)):
        argv = packer_run.build_argv(template, old, "tcg")
        assert argv[-1] == template.json_template.name and argv[-1].endswith(".json")
        assert "-only=qemu" in argv and "-var-file=base.json" in argv
    # ... 1.7 and later the HCL2 template.
    for new in ((1, 7, 0), (1, 9, 4), (1, 11, 2)):
        argv = packer_run.build_argv(template, new, "tcg")
        assert argv[-1] == template.hcl_template.name and argv[-1].endswith(".pkr.hcl")
        assert f"-only=qemu.{template.source_name}" in argv and "-var-file=base.pkrvars.hcl" in argv


@needs_qemu
def test_qemu_img_wrapper_adds_the_backing_format(tmp_path: Path) -> None:
    """Packer 1.6.x's `qemu-img create -b BASE` (no -F) works through the wrapper with qemu >= 6.1."""
    env = packer_run.packer_env(tmp_path, tmp_path / "cache", debug=False)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True, env=env)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", base, overlay, "64M"],
        check=True,
        env=env,
        capture_output=True,
    )
    info = subprocess.run(
        ["qemu-img", "info", overlay], check=True, env=env, capture_output=True, text=True
    ).stdout
    assert "backing file format: qcow2" in info
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / ".bin")
    assert env["CHECKPOINT_DISABLE"] == "1" and env["PACKER_CACHE_DIR"] == str(tmp_path / "cache")
    # Other subcommands pass through unchanged.
    result = subprocess.run(["qemu-img", "--version"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "qemu-img" in result.stdout


@needs_qemu
def test_original_invocation_starts_the_qemu_build(tmp_path: Path) -> None:
    """`packer build -only=qemu -var-file=base.json <distro>.json`, unchanged, runs the qemu builder.

    The "ISO" is random bytes with a matching sha256: Packer verifies it, starts the VM, types the boot
    command, and gives up after the short ssh_timeout; it must leave no qemu behind.
    """
    iso, digest = _fake_iso(tmp_path / "iso")
    tree = tmp_path / "tree"
    _render_local(tree, "rocky-9", iso, f"sha256:{digest}", accelerator="tcg")
    argv = ["packer", "build", "-only=qemu", "-var-file=base.json", "rocky-9-amd64.json"]
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CACHE_DIR": str(tmp_path / "cache")}
    started = time.monotonic()
    result = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=170)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output  # nothing can boot from random bytes
    assert "qemu: Starting VM" in output
    assert "qemu: Typing the boot command" in output
    assert "qemu: Waiting for SSH to become available" in output
    assert "Timeout waiting for SSH" in output
    assert time.monotonic() - started < 160
    assert not (tree / "output-rocky-9-amd64").exists()
    time.sleep(1)
    assert _qemu_processes(str(tree)) == []


def test_wrapper_fails_when_only_matches_nothing(tmp_path: Path) -> None:
    """Packer exits 0 for `-only=qemu-typo`; build_base_with_packer's runner must not."""
    iso, digest = _fake_iso(tmp_path / "iso")
    template = _render_local(tmp_path / "tree", "debian-12", iso, digest)
    runner = _runner(tmp_path / "build.log")
    for version, only in (((1, 6, 6), "qemu-typo"), ((1, 9, 0), "qemu.typo")):
        with pytest.raises(StepFailed, match="without building anything") as failure:
            run_packer_build(template, runner, version=version, accelerator="tcg", only=only)
        assert f"-only={only}" in str(failure.value)
    log = (tmp_path / "build.log").read_text()
    assert (
        "$ packer build -color=false -only=qemu-typo -var-file=base.json -var=accelerator=tcg "
        "-var=cpu_model=max,erms=off,fsrm=off debian-12-amd64.json" in log
    )
    assert "-var-file=base.pkrvars.hcl" in log and "debian-12-amd64.pkr.hcl" in log
    assert "qemu: Starting VM" not in log


def test_packer_itself_rejects_a_wrong_checksum(tmp_path: Path) -> None:
    """An ISO changed after rendering: Packer's own verification fails the build (JSON and HCL2)."""
    iso, digest = _fake_iso(tmp_path / "iso")
    template = _render_local(tmp_path / "tree", "ubuntu-24.04", iso, digest)
    iso.write_bytes(b"not the same bytes")
    runner = _runner(tmp_path / "build.log")
    for version in ((1, 6, 6), (1, 9, 0)):
        with pytest.raises(StepFailed, match="packer build"):
            run_packer_build(template, runner, version=version, accelerator="tcg")
    log = (tmp_path / "build.log").read_text()
    assert log.count("Retrieving ISO") == 2  # both formats selected the build
    assert re.search(r"checksum|Checksums did not match", log, re.I)
    assert "Starting VM" not in log


def test_build_base_refuses_a_wrong_checksum_before_packer(tmp_path: Path) -> None:
    iso, digest = _fake_iso(tmp_path / "iso")
    runner = _runner(tmp_path / "build.log")
    wrong = "sha256:" + ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(InputError, match="checksum mismatch"):
        build_base_with_packer(
            "base",
            ImageConfig(distribution="debian-12"),
            MachineConfig(),
            tmp_path / "work",
            runner,
            "tcg",
            iso,
            wrong,
            False,
        )
    with pytest.raises(InputError, match="not accepted"):
        build_base_with_packer(
            "base",
            ImageConfig(distribution="debian-12"),
            MachineConfig(),
            tmp_path / "work",
            runner,
            "tcg",
            iso,
            "none",
            False,
        )
    assert "packer build" not in (tmp_path / "build.log").read_text()


# ----- end to end (needs a real installer ISO) ----------------------------------------------------


def _iso_env(name: str) -> str:
    return "STAGE4_TEST_ISO_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


@pytest.mark.slow
@pytest.mark.parametrize("name", distributions.installer_names())
def test_installer_build_end_to_end(tmp_path: Path, name: str) -> None:
    variable = _iso_env(name)
    iso, checksum = os.environ.get(variable), os.environ.get(variable + "_SHA256")
    if not iso or not checksum:
        pytest.skip(
            f"set {variable} and {variable}_SHA256 to an installer ISO and its sha256 to run this build"
        )
    from stage4.image.inspect import inspect_image

    runner = _runner(tmp_path / "build.log")
    # 'auto' lets Packer pick KVM where /dev/kvm exists; set tcg where KVM guests do not run.
    accelerator = os.environ.get("STAGE4_TEST_ACCELERATOR", "auto")
    image = ImageConfig(distribution=name, identifier="system")
    qcow2 = build_base_with_packer(
        "e2e",
        image,
        MachineConfig(),
        tmp_path / "work",
        runner,
        str(accelerator),
        iso,
        checksum,
        True,
        ssh_timeout="90m",
    )
    assert qcow2.is_file()
    report = inspect_image(qcow2, identifier="system")
    assert report.passed, report.to_dict()
    result = subprocess.run(
        [sys.executable, "-m", "stage4", "boot", str(qcow2), "--identifier", "system", "--timeout", "900"],
        capture_output=True,
        text=True,
        timeout=1000,
    )
    assert result.returncode == 0, result.stdout + result.stderr
