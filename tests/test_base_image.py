"""The default base image, built for real and checked with tools that did not write it."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stage4 import api
from stage4.fsutil import sha256_file
from stage4.provisioning.ansible import ROLES_DIR
from tests.conftest import BuiltImage, run_stage4

pytestmark = pytest.mark.slow


def sfdisk(raw: Path) -> dict:
    return json.loads(
        subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True).stdout
    )["partitiontable"]


def root_entry(table: dict, identifier: str) -> dict:
    (entry,) = [p for p in table["partitions"] if p.get("name") == identifier]
    return entry


@contextlib.contextmanager
def mounted_root(raw: Path, mnt: Path, writable: bool = False) -> Iterator[Path]:
    """The SLX_SYS partition of the raw disk RAW mounted at MNT (by loop offset: the host kernel has no
    partition parser), read-only unless WRITABLE."""
    entry = root_entry(sfdisk(raw), "SLX_SYS")
    mnt.mkdir()
    options = f"loop,offset={entry['start'] * 512},sizelimit={entry['size'] * 512}"
    subprocess.run(["mount", "-o", options if writable else f"ro,{options}", raw, mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def blkid(raw: Path, offset: int) -> dict:
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", "-O", str(offset), str(raw)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def debugfs(raw: Path, offset: int, command: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", command, f"{raw}?offset={offset}"], check=True, capture_output=True, text=True
    ).stdout


def test_gpt_name_and_filesystem_label_are_the_identifier(base_image: BuiltImage, raw_copy: Path) -> None:
    table = sfdisk(raw_copy)
    assert table["label"] == "gpt"
    names = [p.get("name") for p in table["partitions"]]
    assert names == ["bios_grub", "ESP", "SLX_SYS"]
    assert table["partitions"][0]["type"] == "21686148-6449-6E6F-744E-656564454649"
    assert table["partitions"][1]["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    root = root_entry(table, "SLX_SYS")
    tags = blkid(raw_copy, root["start"] * table["sectorsize"])
    assert tags["LABEL"] == "SLX_SYS"
    assert tags["TYPE"] == "ext4"
    assert blkid(raw_copy, table["partitions"][1]["start"] * 512)["TYPE"] == "vfat"
    # sfdisk's own verification of the table, including the backup GPT at the end of the disk
    verify = subprocess.run(["sfdisk", "--verify", str(raw_copy)], capture_output=True, text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout + verify.stderr


def test_qcow2_is_standalone_clean_and_compressed(base_image: BuiltImage) -> None:
    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(base_image.path)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    result = json.loads(check.stdout)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(base_image.path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    specific = info["format-specific"]["data"]
    assert specific["compat"] == "1.1"
    assert specific["compression-type"] == "zstd"
    assert specific["corrupt"] is False
    assert info["dirty-flag"] is False
    assert info["virtual-size"] == 3 << 30
    # compressed: far smaller on disk than the data it holds
    assert base_image.path.stat().st_size < base_image.manifest["rootfs_bytes"] * 0.6


def test_base_holds_what_ansible_needs_and_no_compiler(base_image: BuiltImage, raw_copy: Path) -> None:
    table = sfdisk(raw_copy)
    offset = root_entry(table, "SLX_SYS")["start"] * 512
    status = debugfs(raw_copy, offset, "cat /var/lib/dpkg/status")
    installed = set()
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if fields.get("Status") == "install ok installed":
            installed.add(fields["Package"])
    assert {"python3", "sudo", "openssh-server", "systemd-sysv", "dracut"} <= installed
    assert not installed & {"gcc", "gcc-12", "cpp", "make", "build-essential", "xserver-xorg-core"}
    assert "sshd" in debugfs(raw_copy, offset, "ls -p /usr/sbin")
    assert "gcc" not in debugfs(raw_copy, offset, "ls -p /usr/bin").split("/")
    assert set(base_image.manifest["packages"]) == installed


def test_documentation_is_left_out_and_stays_out(raw_copy: Path, tmp_path: Path) -> None:
    """dpkg's path filters held for every package, the essential ones that mmdebstrap extracts before
    dpkg runs as well (bootstrap.extract_script), and stay in the image for the layers' packages."""

    def regular(path: Path) -> bool:  # dpkg's filters leave symlinks (e.g. doc/openssh-server) in place
        return path.is_file() and not path.is_symlink()

    with mounted_root(raw_copy, tmp_path / "mnt") as mnt:
        share = mnt / "usr/share"
        found = {
            folder: sorted(str(p.relative_to(share)) for p in (share / folder).rglob("*") if regular(p))
            for folder in ("man", "info", "doc", "locale")
        }
        filters = (mnt / "etc/dpkg/dpkg.cfg.d/99mmdebstrap").read_text()
    assert found["man"] == []
    assert found["info"] in ([], ["info/dir"])  # install-info's index, made by its trigger, not unpacked
    assert set(found["locale"]) <= {"locale/locale.alias"}  # (the package `locales` is not in the base)
    assert {Path(p).name for p in found["doc"]} == {"copyright"}
    # among them those of essential packages (coreutils, bash) and of the others (python3, openssh)
    assert {"doc/coreutils/copyright", "doc/bash/copyright", "doc/python3/copyright"} <= set(found["doc"])
    assert "path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/info/*" in filters
    assert "path-include=/usr/share/doc/*/copyright" in filters


def test_no_password_and_no_shared_host_keys(raw_copy: Path) -> None:
    offset = root_entry(sfdisk(raw_copy), "SLX_SYS")["start"] * 512
    shadow = debugfs(raw_copy, offset, "cat /etc/shadow")
    for line in shadow.splitlines():
        user, password = line.split(":")[:2]
        assert password in ("*", "!", "!*", ""), f"{user} has a password hash"
        assert password != "", f"{user} has an empty password"
    ssh_dir = debugfs(raw_copy, offset, "ls -p /etc/ssh")
    assert "ssh_host_" not in ssh_dir
    assert debugfs(raw_copy, offset, "cat /etc/machine-id").strip() == ""
    fstab = debugfs(raw_copy, offset, "cat /etc/fstab")
    assert re.search(r"^PARTLABEL=SLX_SYS\s+/\s+ext4\s", fstab, re.M)


def test_a_machine_offered_no_host_keys_makes_its_own(raw_copy: Path, tmp_path: Path) -> None:
    """A real client has no fw_cfg: the base's host-key script, run in the image, generates the set that
    `ssh-keygen -A` makes (on a tmpfs over the read-only image's /etc/ssh)."""
    with mounted_root(raw_copy, tmp_path / "mnt") as mnt:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt / "etc/ssh"], check=True)
        try:
            made = subprocess.run(
                ["chroot", mnt, "/bin/sh", "/usr/lib/stage4/ssh-host-keys.sh"], capture_output=True, text=True
            )
            names = {p.name for p in (mnt / "etc/ssh").iterdir()}
        finally:
            subprocess.run(["umount", mnt / "etc/ssh"], check=True)
    assert made.returncode == 0, made.stderr
    kinds = ("rsa", "ecdsa", "ed25519")
    assert names == {f"ssh_host_{kind}_key{suffix}" for kind in kinds for suffix in ("", ".pub")}


def test_cleanup_leaves_a_way_to_host_keys_where_ssh_makes_none(
    base_image: BuiltImage, tmp_path: Path
) -> None:
    """The prod layer's cleanup removes the host keys. On a base without stage4-ssh-host-keys.service (a
    Debian or Ubuntu install by Packer), it gives ssh.service a drop-in that makes them before sshd starts;
    on a bootstrap base it leaves the base's own drop-in alone."""
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", base_image.path, raw], check=True)
    mnt = tmp_path / "mnt"
    dropin = mnt / "etc/systemd/system/ssh.service.d/stage4-host-keys.conf"
    script = (ROLES_DIR / "stage4_cleanup/files/cleanup.sh").read_text()

    def cleanup() -> None:
        subprocess.run(
            ["chroot", mnt, "/bin/sh", "-s", "--", "", "no-such-key"], input=script, text=True, check=True
        )

    with mounted_root(raw, mnt, writable=True):
        ours = dropin.read_text()
        cleanup()
        kept = dropin.read_text()
        (mnt / "etc/systemd/system/stage4-ssh-host-keys.service").unlink()
        cleanup()
        given = dropin.read_text()
        (mnt / "run/sshd").mkdir(exist_ok=True)
        starts = [line.split("=", 1)[1] for line in given.splitlines() if line.startswith("ExecStartPre=/")]
        ran = [
            subprocess.run(["chroot", mnt, *line.split()], capture_output=True, text=True) for line in starts
        ]
        keys = sorted(p.name for p in (mnt / "etc/ssh").glob("ssh_host_*_key"))
    assert kept == ours
    assert starts == ["/usr/bin/ssh-keygen -A", "/usr/sbin/sshd -t"]
    assert [r.returncode for r in ran] == [0, 0], [r.stderr for r in ran]
    assert keys == ["ssh_host_ecdsa_key", "ssh_host_ed25519_key", "ssh_host_rsa_key"]


def test_manifest_describes_the_image(base_image: BuiltImage) -> None:
    manifest = base_image.manifest
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["identity"])
    assert manifest["image"]["sha256"] == sha256_file(base_image.path)
    assert manifest["image"]["size"] == base_image.path.stat().st_size
    assert manifest["inputs"]["identifier"] == "SLX_SYS"
    assert manifest["kernel_versions"] and all(v.endswith("-amd64") for v in manifest["kernel_versions"])
    assert manifest["packages"]["python3"]


def test_inspect_passes(base_image: BuiltImage) -> None:
    report = api.inspect(base_image.path)
    assert report.passed, report.problems()
    assert report.identifier == "SLX_SYS"
    assert list(report.kernels) == base_image.manifest["kernel_versions"]
    cli = run_stage4("inspect", "--json", str(base_image.path))
    assert cli.returncode == 0, cli.stderr
    data = json.loads(cli.stdout)
    assert data["passed"] is True
    assert data["qcow2"]["backing_file"] is None and data["qcow2"]["compression"] == "zstd"
    assert {c["name"] for c in data["checks"] if c["passed"]} >= {
        "no backing file",
        "its filesystem label is 'SLX_SYS'",
    }


def test_inspect_fails_on_an_overlay_and_a_wrong_identifier(base_image: BuiltImage, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(base_image.path), str(overlay)],
        check=True,
        capture_output=True,
    )
    report = api.inspect(overlay)
    assert not report.passed
    assert any(problem.startswith("no backing file") for problem in report.problems())
    cli = run_stage4("inspect", "--identifier", "system", str(base_image.path))
    assert cli.returncode == 1
    assert "FAIL a partition with GPT name 'system'" in cli.stdout


def test_second_build_reuses_the_unchanged_base(base_image: BuiltImage) -> None:
    before = sha256_file(base_image.path)
    (result,) = api.build(base_image.config, ["debian-12"])
    assert result.reused
    assert result.identity == base_image.manifest["identity"]
    assert sha256_file(result.image) == before


def test_boots_via_its_own_bootloader(base_image: BuiltImage) -> None:
    result = api.boot(base_image.config, base_image.path, via="bootloader", timeout=400)
    log = result.serial_log.read_text(errors="replace")
    assert f"STAGE4-USERSPACE-UP {result.marker}" in log
    assert "GRUB" in log or "Booting `" in log
    assert result.powered_off
    # read-only like a client: the image is unchanged
    assert sha256_file(base_image.path) == base_image.manifest["image"]["sha256"]


def test_boots_via_extracted_kernel_with_partlabel_root(base_image: BuiltImage) -> None:
    cli = run_stage4(
        "boot", "--via", "kernel", "--timeout", "400", str(base_image.path), cwd=base_image.output_dir
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    match = re.search(r"serial log: (\S+)", cli.stdout)
    assert match, cli.stdout
    log = (
        (base_image.output_dir / match.group(1)).read_text(errors="replace")
        if not Path(match.group(1)).is_absolute()
        else Path(match.group(1)).read_text(errors="replace")
    )
    assert "root=PARTLABEL=SLX_SYS" in log
    assert "STAGE4-USERSPACE-UP" in log


def test_debug_shows_every_command_with_its_output(base_image: BuiltImage) -> None:
    cli = run_stage4("--debug", "inspect", str(base_image.path))
    assert cli.returncode == 0, cli.stderr
    assert "$ qemu-img convert -f qcow2 -O raw" in cli.stderr
    assert "$ sfdisk --json" in cli.stderr
    assert '"label": "gpt"' in cli.stderr  # sfdisk's output, streamed


def test_boots_with_uefi_firmware(base_image: BuiltImage) -> None:
    result = api.boot(base_image.config, base_image.path, via="bootloader", firmware="uefi", timeout=400)
    log = result.serial_log.read_text(errors="replace")
    assert f"STAGE4-USERSPACE-UP {result.marker}" in log
    assert "EFI" in log
    # sshd came up with the host key stage4 made for this boot on the host, not with one made in the guest
    assert f"ssh_ed25519={result.ssh_host_key}" in log
