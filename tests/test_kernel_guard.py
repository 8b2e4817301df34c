"""The kernel coupling guard's reading of a root tree and the per-kernel verdict of inspect (fast).

The real builds (a prod playbook that installs another kernel, the hold read back with debugfs) are in
test_rollouts.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from stage4.errors import StepFailed
from stage4.image.inspect import KernelFacts
from stage4.layers import kernel_guard
from stage4.provisioning import ansible
from stage4.runner import Runner

KERNEL, OTHER = "6.1.0-57-amd64", "6.1.0-57-cloud-amd64"


def kernel_tree(root: Path, version: str, boot: bool = True) -> None:
    (root / "lib/modules" / version / "kernel").mkdir(parents=True)
    if boot:
        (root / "boot").mkdir(exist_ok=True)
        (root / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")


def test_only_the_dev_kernel_passes(tmp_path: Path) -> None:
    kernel_tree(tmp_path, KERNEL)
    (tmp_path / "lib/modules/5.10.0-1-amd64/extra").mkdir(parents=True)  # leftovers of a removed kernel
    assert kernel_guard.installed_kernels(tmp_path) == [KERNEL]
    kernel_guard.check(tmp_path, KERNEL, "prod: check", Runner())


@pytest.mark.parametrize("change", ["another kernel", "modules of another kernel", "no kernel"])
def test_a_changed_kernel_fails_with_one_line_naming_both(tmp_path: Path, change: str) -> None:
    if change == "another kernel":
        kernel_tree(tmp_path, KERNEL)
        kernel_tree(tmp_path, OTHER)
    elif change == "modules of another kernel":
        kernel_tree(tmp_path, KERNEL)
        kernel_tree(tmp_path, OTHER, boot=False)
    prod_has = "no kernel" if change == "no kernel" else f"{KERNEL}, {OTHER}"
    expected = (
        "debian-12: prod: kernel and package list failed: the prod layer changed the kernel: the dev run "
        f"built the initramfs and modules for {KERNEL}, prod has {prod_has}"
    )
    with pytest.raises(StepFailed, match="^" + re.escape(expected) + "$") as caught:
        kernel_guard.check(tmp_path, KERNEL, "debian-12: prod: kernel and package list", Runner())
    message = str(caught.value)
    assert "\n" not in message and KERNEL in message and "prod" in message, message
    assert (OTHER in message) if change != "no kernel" else ("prod has no kernel" in message), message


def test_the_hold_is_read_from_dpkg(tmp_path: Path) -> None:
    status = tmp_path / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    (status.parent / "info").mkdir()
    status.write_text(
        "".join(
            f"Package: {name}\nStatus: {state} ok installed\nArchitecture: amd64\nVersion: 1\nMaintainer: x\n"
            f"Description: x\n\n"
            for name, state in (
                (f"linux-image-{KERNEL}", "hold"),
                ("linux-image-amd64", "hold"),
                ("bash", "install"),
            )
        )
    )
    assert kernel_guard.hold(tmp_path, Runner()) == {
        "method": "apt-mark hold",
        "packages": [f"linux-image-{KERNEL}", "linux-image-amd64"],
    }


def test_inspect_verdict_per_kernel() -> None:
    good = KernelFacts(KERNEL, f"initrd.img-{KERNEL}", True, {"dnbd3.ko": KERNEL}, [KERNEL])
    assert good.problems() == []
    bad = KernelFacts(KERNEL, f"initrd.img-{KERNEL}", False, {"dnbd3.ko": OTHER}, [OTHER])
    assert bad.problems() == [
        f"no /lib/modules/{KERNEL}/kernel",
        f"extra/dnbd3.ko is built for {OTHER}",
        f"its initramfs holds modules for {OTHER}",
    ]
    assert KernelFacts(KERNEL, "", True).problems() == ["no initramfs"]
    assert "extra modules dnbd3.ko (" + KERNEL + ")" in good.describe()


def test_a_base_with_two_kernels_keeps_both(tmp_path: Path) -> None:
    old = "6.1.0-50-amd64"
    kernel_tree(tmp_path, KERNEL)
    kernel_tree(tmp_path, old)
    kernel_guard.check(tmp_path, KERNEL, "prod: check", Runner(), [old, KERNEL])
    (tmp_path / "boot" / f"vmlinuz-{old}").unlink()
    (tmp_path / "lib/modules" / old / "kernel").rmdir()
    with pytest.raises(
        StepFailed, match=f"for {KERNEL}, prod has {KERNEL} \\(the base has {old}, {KERNEL}\\)"
    ):
        kernel_guard.check(tmp_path, KERNEL, "prod: check", Runner(), [old, KERNEL])


def test_the_roles_load(tmp_path: Path) -> None:
    """Ansible loads every shipped role (its argument splitter rejects, e.g., an unbalanced quote in a
    shell comment)."""
    roles = sorted(p.name for p in ansible.ROLES_DIR.iterdir() if (p / "tasks/main.yml").is_file())
    assert "stage4_kernel_hold" in roles
    playbook = tmp_path / "site.yml"
    playbook.write_text(f"- hosts: all\n  roles: {roles}\n")
    out = subprocess.run(
        [ansible.ansible_playbook(), "--syntax-check", "-i", "localhost,", str(playbook)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_ROLES_PATH": str(ansible.ROLES_DIR)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
