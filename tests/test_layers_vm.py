"""The VM way of provisioning a layer: boot it in qemu, Ansible over SSH with a per-build key.

One short real run on an overlay of the session's base (TCG here: about 1.5 minutes to SSH).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stage4.image import overlay
from stage4.image.filesystem import extract_boot_files
from stage4.machine import accel
from stage4.provisioning import ansible, attach, vm
from stage4.runner import Runner
from tests.conftest import BuiltImage, require
from tests.readback import attached_to, read_files

pytestmark = pytest.mark.slow

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Write a file as root over SSH
      ansible.builtin.copy:
        content: "provisioned over ssh\\n"
        dest: /etc/stage4-vm
        mode: "0644"
    - name: Resolve the mirror's name (the image's resolver, from DHCP through systemd-resolved)
      ansible.builtin.command: getent hosts deb.debian.org
      changed_when: false
"""


def test_vm_way_runs_a_playbook_over_ssh_and_removes_the_build_user(
    base_image: BuiltImage, tmp_path: Path
) -> None:
    require("qemu-system-x86_64", "qemu-storage-daemon", "ssh", "ssh-keygen")
    cfg, runner = base_image.config, Runner()
    work = cfg.build.cache_dir / "work" / f"test-vm-{tmp_path.name}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        layer = work / "layer.qcow2"
        overlay.create(base_image.path, layer, runner, "overlay")
        part = attach.RootPartition.from_manifest(
            base_image.manifest, base_image.identifier, base_image.filesystem
        )
        kernel, _ = extract_boot_files(base_image.path, work / "probe", runner, base_image.identifier)
        accelerator = accel.choose(cfg.machine.accelerator.value, kernel, runner, cfg.build.cache_dir)
        playbook = tmp_path / "small.yml"
        playbook.write_text(PLAYBOOK)
        with vm.running(
            layer, part, accelerator, cfg.machine.cpus, cfg.machine.memory >> 20, work, runner, "test vm"
        ) as target:
            assert target.way == "vm" and (work / "build_key").is_file()
            # with the prod layer's closing cleanup role, which removes the SSH host keys the VM runs on
            plays = ansible.site([], [playbook], [ansible.play("stage4 prod: cleanup", ["stage4_cleanup"])])
            ansible.run(target, plays, {}, work / "ansible", runner, "test vm")
        assert not (work / "build_key").exists()
        assert attached_to(work) == []
        files = read_files(
            layer,
            "/etc/stage4-vm",
            "/etc/passwd",
            "/etc/sudoers.d/stage4-build",
            "/etc/ssh/ssh_host_ed25519_key",
        )
        assert files["/etc/stage4-vm"] == "provisioned over ssh\n"
        assert files["/etc/ssh/ssh_host_ed25519_key"] is None
        assert "stage4-build" not in files["/etc/passwd"]
        assert files["/etc/sudoers.d/stage4-build"] is None
        info = subprocess.run(["qemu-img", "check", str(layer)], capture_output=True, text=True)
        assert info.returncode == 0, info.stdout
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
