"""way = "packer": a layer provisioned by Packer's qemu builder (disk_image + use_backing_file over the
layer) and its ansible provisioner (use_proxy false). One real run: a prod layer over the session's
bootstrap base (dev by the chroot way, no components), about 3-4 minutes under TCG.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.provisioning import ansible, packer_way
from stage4.runner import Runner
from tests.conftest import FIXTURES, BuiltImage, full_matrix, require, run_stage4, variant
from tests.readback import attached_to, read_files

NAME = "debian-12"
PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Write a file as root, run by Packer
      ansible.builtin.copy:
        content: "{{ packer_text }}\\n"
        dest: /etc/stage4-packer
        mode: "0644"
"""


def test_rendered_layer_templates_validate_with_the_installed_packer(tmp_path: Path) -> None:
    require("packer", "ssh-keygen")
    key = tmp_path / "build_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(layer), "64M"], check=True)
    cfg = config.from_dict(
        {"build": {"output_dir": str(tmp_path / "out")}, "images": {NAME: {"distribution": NAME}}},
        str(tmp_path / "stage4.toml"),
    )
    prepared = ansible.prepare(
        ansible.Target("vm", port=2299, key=key), ansible.site([], [], []), {}, tmp_path / "a"
    )
    template = packer_way.render(
        tmp_path / "packer",
        layer,
        "sha256:" + "0" * 64,
        "64M",
        cfg.machine,
        key,
        2299,
        prepared,
        "test: prod",
    )
    data = json.loads(template.json_template.read_text())
    (builder,), (provisioner,) = data["builders"], data["provisioners"]
    assert builder["disk_image"] is True and builder["use_backing_file"] is True
    assert builder["vnc_bind_address"] == "127.0.0.1" and "vnc_port_min" not in builder
    assert provisioner["type"] == "ansible" and provisioner["use_proxy"] is False
    assert provisioner["inventory_file"] == str(prepared.inventory)
    env = {"CHECKPOINT_DISABLE": "1", "PATH": "/usr/bin:/bin"}
    for argv in (
        ["-var-file=base.json", template.json_template.name],
        ["-var-file=base.pkrvars.hcl", template.hcl_template.name],
    ):
        result = subprocess.run(
            ["packer", "validate", *argv], cwd=template.tree, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@full_matrix  # provisioning in a VM, with its resolver: test_layers_vm; the templates: validated above
def test_prod_layer_by_packer_over_the_bootstrap_base(base_image: BuiltImage, tmp_path: Path) -> None:
    require("packer", "qemu-system-x86_64", "qemu-storage-daemon", "ssh-keygen")
    for name in ("dracut",):
        shutil.copytree(FIXTURES / name, tmp_path / name)
    playbook = tmp_path / "prod.yml"
    playbook.write_text(PLAYBOOK)
    image = {
        "distribution": NAME,
        "dev": {},
        "prod": {"way": "packer", "playbooks": [str(playbook)], "vars": {"packer_text": "made by packer"}},
        "initramfs": {"dracut_modules": ["stage4test"], "source": {"path": str(tmp_path / "dracut")}},
        "components": {},
    }
    # A copy of the base fixture's folder, with its settings: its base is reused.
    cfg = variant(base_image.path.parent, tmp_path / "copy", image)
    (result,) = api.build(cfg, [NAME])
    assert result.built[-1] == "prod"
    manifest = json.loads((result.image.parent / "prod.json").read_text())
    assert manifest["way"] == "packer" and manifest["identity"] == result.identity

    files = read_files(
        result.image,
        "/etc/stage4-packer",
        "/etc/passwd",
        "/etc/sudoers.d/stage4-build",
        "/home/stage4-build/.ssh/authorized_keys",
    )
    assert files["/etc/stage4-packer"] == "made by packer\n"
    assert "stage4-build" not in files["/etc/passwd"]
    assert (
        files["/etc/sudoers.d/stage4-build"] is None
        and files["/home/stage4-build/.ssh/authorized_keys"] is None
    )
    report = api.inspect(result.image)
    assert report.passed, report.problems()
    cli = run_stage4("inspect", str(result.image))
    assert cli.returncode == 0, cli.stdout + cli.stderr

    work = cfg.build.cache_dir / "work"
    assert not list(work.glob(f"{NAME}-layers-*/prod"))  # work folder gone, with the build key in it
    assert attached_to(work) == []
    leftover = subprocess.run(["pgrep", "-af", "packer|qemu-system"], capture_output=True, text=True).stdout
    assert str(work) not in leftover, leftover


def test_missing_packer_is_one_line_naming_the_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stage4.errors import StepFailed

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no packer on it
    with pytest.raises(
        StepFailed,
        match="^"
        + re.escape(
            "img: prod: provision (packer) failed: "
            'Packer is not installed (run ./install.sh, or use way = "vm")'
        )
        + "$",
    ) as caught:
        packer_way.check_packer(Runner(), "img: prod: provision (packer)")
    message = str(caught.value)
    assert (
        message.startswith("img: prod: provision (packer) failed: Packer is not installed")
        and "\n" not in message
    )
