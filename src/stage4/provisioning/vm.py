"""The VM way: boot the layer in qemu and let Ansible in over SSH with a key made for this build.

Before the boot the layer is attached on the host once to add the build user with the build key's
public half and a sudo rule; after the poweroff it is attached again to remove both. The key pair
(ed25519) lives in the work directory and is deleted with it. qemu and Ansible are recorded in the work
directory (Runner.recording) for the cleanup after a killed build.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from stage4.errors import StepFailed
from stage4.machine import ssh_host_keys
from stage4.machine.qemu_argv import headless_argv
from stage4.provisioning import attach
from stage4.provisioning.ansible import BUILD_KEY_COMMENT, BUILD_USER, Target
from stage4.runner import Runner

BOOT_TIMEOUT = 900
SSH_TIMEOUT = 300
POWEROFF_WAIT = 120


def make_key(work: Path, runner: Runner, step: str) -> Path:
    key = work / "build_key"
    key.unlink(missing_ok=True)
    key.with_suffix(".pub").unlink(missing_ok=True)
    runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", BUILD_KEY_COMMENT, "-f", key], step=step)
    return key


def add_build_user(root: Path, public_key: str, runner: Runner, step: str) -> None:
    runner.run(["chroot", root, "useradd", "--create-home", "--shell", "/bin/bash", BUILD_USER], step=step)
    ssh_dir = root / "home" / BUILD_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(public_key, encoding="utf-8")
    runner.run(
        ["chroot", root, "chown", "-R", f"{BUILD_USER}:{BUILD_USER}", f"/home/{BUILD_USER}/.ssh"], step=step
    )
    sudoers = root / "etc/sudoers.d" / BUILD_USER
    sudoers.write_text(f"{BUILD_USER} ALL=(ALL) NOPASSWD:ALL\n", encoding="utf-8")
    sudoers.chmod(0o440)


def remove_build_user(root: Path, runner: Runner, step: str) -> None:
    runner.run(["chroot", root, "userdel", "--force", "--remove", BUILD_USER], step=step, check=False)
    (root / "etc/sudoers.d" / BUILD_USER).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]  # (host, port) of an AF_INET socket
        return port


def qemu_argv(
    overlay: Path, accelerator: str, cpus: int, memory_mib: int, port: int, nonce: str, qmp: Path
) -> list[str]:
    return [
        *headless_argv(accelerator, cpus, memory_mib),
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2,cache=writeback",
        "-nic",
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-fw_cfg",
        f"name=opt/org.stage4/marker,string={nonce}",
    ]


def press_power_button(qmp: Path) -> None:
    """ACPI power button through qemu's QMP socket: needs no login (the cleanup role may have removed
    the SSH host keys, so a new SSH connection can fail at the very end)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(qmp))
        sock.recv(4096)  # the greeting
        for command in (b'{"execute": "qmp_capabilities"}', b'{"execute": "system_powerdown"}'):
            sock.sendall(command + b"\n")
            sock.recv(4096)


def _ssh(key: Path, port: int, *command: str) -> list[str]:
    return [
        "ssh",
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "BatchMode=yes",
        f"{BUILD_USER}@127.0.0.1",
        *command,
    ]


@contextlib.contextmanager
def build_user(
    overlay: Path, part: attach.RootPartition, work: Path, runner: Runner, step: str
) -> Iterator[Path]:
    """A per-build ed25519 key and the build user (key login, sudo rule) in the layer while the context lasts.

    The user is added by attaching the layer on the host before it boots; after a successful run the layer
    is attached again to remove the user and the rule. The private key is deleted in every case.
    """
    key = make_key(work, runner, step)
    try:
        with attach.attached(overlay, part, work / "attach", runner, writable=True, step=step) as root:
            add_build_user(root, key.with_suffix(".pub").read_text(encoding="utf-8"), runner, step)
        yield key
    finally:
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
    with attach.attached(
        overlay, part, work / "attach", runner, writable=True, step=f"{step} (remove build user)"
    ) as root:
        remove_build_user(root, runner, step)


@contextlib.contextmanager
def running(
    overlay: Path,
    part: attach.RootPartition,
    accelerator: str,
    cpus: int,
    memory_mib: int,
    work: Path,
    runner: Runner,
    step: str,
) -> Iterator[Target]:
    """The layer booted in qemu with SSH forwarded; powered off cleanly (or killed) on exit."""
    # A unix socket path may have 108 bytes at most; work folders can be deeper than that.
    with (
        build_user(overlay, part, work, runner, step) as key,
        runner.recording(work),
        tempfile.TemporaryDirectory(prefix="stage4-qmp-") as sockets,
    ):
        port, nonce = free_port(), secrets.token_hex(8)
        marker = re.compile(rf"STAGE4-USERSPACE-UP {nonce}")
        qmp = Path(sockets) / "qmp.sock"
        host_keys = ssh_host_keys.fw_cfg_argv(Path(sockets), runner, step)
        argv = [*qemu_argv(overlay, accelerator, cpus, memory_mib, port, nonce, qmp), *host_keys]
        with runner.background(argv, step=step, grace=10) as vm:
            started = time.monotonic()
            while not any(marker.search(line) for line in list(vm.lines)):
                if not vm.running():
                    raise StepFailed(
                        step,
                        f"the VM stopped while booting (qemu exit {vm.popen.returncode})",
                        runner.log_path,
                    )
                if time.monotonic() - started > BOOT_TIMEOUT:
                    raise StepFailed(step, f"the VM did not come up within {BOOT_TIMEOUT} s", runner.log_path)
                time.sleep(0.5)
            deadline = time.monotonic() + SSH_TIMEOUT
            while runner.run(_ssh(key, port, "true"), step=step, check=False, timeout=60).returncode != 0:
                if time.monotonic() > deadline:
                    raise StepFailed(
                        step, f"no SSH login into the VM within {SSH_TIMEOUT} s", runner.log_path
                    )
                time.sleep(3)
            yield Target("vm", port=port, key=key)
            poweroff = runner.run(
                _ssh(key, port, "sudo", "systemctl", "poweroff"),
                step=f"{step} (poweroff)",
                check=False,
                timeout=60,
            )
            if poweroff.returncode == 255 and vm.running():  # no SSH login any more: press the power button
                press_power_button(qmp)
            deadline = time.monotonic() + POWEROFF_WAIT
            while vm.running() and time.monotonic() < deadline:
                time.sleep(0.5)
            if vm.running():
                raise StepFailed(step, f"the VM did not power off within {POWEROFF_WAIT} s", runner.log_path)
