"""The Packer way: a layer provisioned by Packer's qemu builder and its Ansible provisioner.

For sites that know Packer: the run stage4's VM way does, done by `packer build` on a template a
Packer user can read (and rerun from the layer's work directory). The layer overlay on the base gets
the build user and a per-build key (vm.build_user, as in the VM way); Packer boots it with `disk_image`
and `use_backing_file` (its own overlay on the layer, the layer's real sha256 as checksum), runs the
same generated playbook, inventory and variables as the VM way with `use_proxy: false` (Packer 1.6's
SSH proxy offers only an ssh-rsa host key, which OpenSSH >= 8.8 refuses), and powers off. Packer's
overlay is then committed into the layer, the build user and key are removed, and the layer pipeline
goes on as for any other way.

The template is written as legacy JSON for Packer 1.5.6 - 1.6.x and HCL2 for newer Packer, from one
description (builders/packer_template.py), and run by builders/packer_run.run_packer_build: qemu-img
wrapper adding `-F qcow2` on PATH, CHECKPOINT_DISABLE=1, no qcow2 made means failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from stage4.builders import packer, packer_run, packer_template
from stage4.builders.packer_template import (
    Setting,
    Var,
    Variable,
    to_hcl,
    to_json,
    var_file_hcl,
    var_file_json,
)
from stage4.config import MachineConfig
from stage4.errors import StepFailed
from stage4.fsutil import remove_tree, sha256_file
from stage4.image import overlay as overlay_mod
from stage4.machine.qemu_argv import CPU_MODEL_HELP
from stage4.provisioning import ansible, attach, vm
from stage4.runner import Runner

# use_proxy (the only way past the ssh-rsa refusal of OpenSSH >= 8.8) exists since Packer 1.5.6.
MIN_VERSION = (1, 5, 6)
SSH_TIMEOUT = f"{(vm.BOOT_TIMEOUT + vm.SSH_TIMEOUT) // 60}m"
SOURCE = "layer"
OUTPUT = Path(f"output-{SOURCE}") / f"{SOURCE}.qcow2"


class PackerFacts(TypedDict):
    """What a layer's Packer run reports."""

    packer_version: str
    packer_overlay_size: int


def check_packer(runner: Runner, step: str) -> tuple[int, int, int]:
    """The installed Packer's version; a one-line error when it is missing, too old or lacks plugins."""
    env = {"CHECKPOINT_DISABLE": "1"}
    try:
        version = packer_run.packer_version(runner, env=env)
    except StepFailed as exc:
        if "command not found" in str(exc):
            raise StepFailed(
                step, 'Packer is not installed (run ./install.sh, or use way = "vm")', runner.log_path
            ) from None
        raise StepFailed(step, f"cannot run Packer: {exc}", runner.log_path) from None
    shown = ".".join(map(str, version))
    if version < MIN_VERSION:
        raise StepFailed(
            step,
            f'Packer {shown} is too old for way = "packer": the ansible provisioner\'s '
            f"use_proxy needs >= {'.'.join(map(str, MIN_VERSION))}",
            runner.log_path,
        )
    if version >= packer_run.FIRST_UNBUNDLED_VERSION:
        installed = runner.run(
            ["packer", "plugins", "installed"], step=step, capture=True, env=env, check=False
        ).stdout
        missing = [name for name in ("qemu", "ansible") if name not in installed]
        if missing:
            raise StepFailed(
                step,
                f"Packer {shown} has no {' and no '.join(missing)} plugin: install it with "
                + "; ".join(f"packer plugins install github.com/hashicorp/{m}" for m in missing),
                runner.log_path,
            )
    return version


def _variables(values: Mapping[str, Setting]) -> list[Variable]:
    described = {
        "cpus": ("number", "virtual CPUs of the layer's VM"),
        "memory": ("number", "memory of the layer's VM in MiB"),
        "disk_size": ("string", "the layer's virtual size: the base's (Packer must not resize it)"),
        "accelerator": ("string", "kvm or tcg; empty: kvm if /dev/kvm exists, else tcg"),
        "cpu_model": ("string", CPU_MODEL_HELP),
        "headless": ("bool", "run qemu without a window"),
        "ssh_timeout": ("string", "how long to wait for the layer's SSH"),
    }
    return packer_template.variables(values, described)


def render(
    tree: Path,
    layer: Path,
    checksum: str,
    disk_size: str,
    machine: MachineConfig,
    key: Path,
    port: int,
    prepared: ansible.Prepared,
    label: str,
) -> packer.RenderedTemplate:
    """Write the layer's Packer tree: base.json/base.pkrvars.hcl, layer.json (1.6.x), layer.pkr.hcl."""
    values: dict[str, Setting] = {**packer.base_values(machine, SSH_TIMEOUT), "disk_size": disk_size}
    iso_url = str(layer.absolute())
    builder: dict[str, Setting] = {
        "type": "qemu",
        "name": "qemu",
        "iso_url": iso_url,
        "iso_checksum": checksum,
        "disk_image": True,
        "use_backing_file": True,
        "output_directory": str(OUTPUT.parent),
        "vm_name": OUTPUT.name,
        "format": "qcow2",
        "disk_size": Var("disk_size"),
        "disk_interface": "virtio",
        "net_device": "virtio-net",
        "accelerator": Var("accelerator"),
        "cpus": Var("cpus"),
        "memory": Var("memory"),
        "headless": Var("headless"),
        # SSH forwarded on the loopback only (Packer's own -netdev listens on every address).
        "qemuargs": [
            ["-cpu", Var("cpu_model")],
            ["-netdev", f"user,id=user.0,hostfwd=tcp:127.0.0.1:{port}-:22"],
        ],
        # Default VNC ports: Packer 1.6 computes the display number from vnc_port_min (wrong otherwise).
        "vnc_bind_address": "127.0.0.1",
        "host_port_min": port,
        "host_port_max": port,
        "boot_wait": "1s",
        "communicator": "ssh",
        "ssh_host": "127.0.0.1",
        "ssh_username": ansible.BUILD_USER,
        "ssh_private_key_file": str(key),
        "ssh_timeout": Var("ssh_timeout"),
        "ssh_handshake_attempts": 100,
        "shutdown_command": "sudo -n systemctl poweroff",
        "shutdown_timeout": "5m",
    }
    provisioner: dict[str, Setting] = {
        "type": "ansible",
        "command": ansible.ansible_playbook(),
        "playbook_file": str(prepared.playbook),
        "inventory_file": str(prepared.inventory),  # stage4's inventory: the fixed port, key, become
        "user": ansible.BUILD_USER,
        "use_proxy": False,
        "extra_arguments": ["-e", f"@{prepared.variables}"],
        "ansible_env_vars": [f"{name}={value}" for name, value in prepared.env.items()],
    }
    description = f"{label}: a stage4 layer provisioned by Packer over {layer.name} (generated by stage4)."
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "base.json").write_text(var_file_json(values), encoding="utf-8")
    (tree / "base.pkrvars.hcl").write_text(var_file_hcl(values), encoding="utf-8")
    json_path, hcl_path = tree / f"{SOURCE}.json", tree / f"{SOURCE}.pkr.hcl"
    variables = _variables(values)
    json_path.write_text(to_json(builder, variables, description, [provisioner]), encoding="utf-8")
    hcl_path.write_text(to_hcl(builder, variables, SOURCE, description, [provisioner]), encoding="utf-8")
    return packer.RenderedTemplate(label, SOURCE, SOURCE, json_path, hcl_path, OUTPUT, iso_url, checksum)


def _failure(exc: StepFailed, log_path: Path | None) -> str:
    """Packer's own error and the Ansible task that failed, from the build log (or the error's tail)."""
    lines = str(exc).split(" | ")
    if log_path and log_path.is_file():
        logged = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        start = max((i for i, line in enumerate(logged) if "$ packer build" in line), default=0)
        lines = logged[start:]
    task, fatal, errored = "", "", ""
    for line in lines:
        text = re.sub(r"^(\d\d:\d\d:\d\d\.\d+ )?\s*(==> )?(qemu: )?", "", line).strip()
        if text.startswith("TASK ["):
            task = text.removeprefix("TASK [").split("]")[0]
        elif text.startswith(("fatal:", "failed:")) or text.startswith(("ERROR!", "[ERROR]")):
            fatal = f"task '{task}': {text}" if task else text
        elif "Build 'qemu' errored" in text:
            errored = text.split("errored:", 1)[-1].strip()
    detail = "packer build failed" + (
        f": {errored}" if errored else f" ({str(exc).split(' failed: ', 1)[-1]})"
    )
    return detail + (f"; {fatal[:500]}" if fatal else "")


def provision(
    layer: Path,
    part: attach.RootPartition,
    accelerator: str,
    machine: MachineConfig,
    plays: list[ansible.Play],
    variables: dict[str, Any],
    work: Path,
    runner: Runner,
    step: str,
    label: str,
) -> PackerFacts:
    """Provision the qcow2 `layer` (an overlay on the base) with Packer; returns facts of the run."""
    version = check_packer(runner, step)
    tree = work / "packer"
    remove_tree(tree)
    with vm.build_user(layer, part, work, runner, step) as key:
        port = vm.free_port()
        prepared = ansible.prepare(
            ansible.Target("vm", port=port, key=key), plays, variables, work / "ansible"
        )
        size = overlay_mod.info(layer, runner, step)["virtual-size"]
        disk_size = f"{-(-size // packer.MIB)}M"
        template = render(
            tree, layer, f"sha256:{sha256_file(layer)}", disk_size, machine, key, port, prepared, label
        )
        try:
            output = packer_run.run_packer_build(
                template,
                runner,
                version=version,
                accelerator=accelerator,
                cache_dir=tree / "packer_cache",
                label=step,
            )
        except StepFailed as exc:
            raise StepFailed(step, _failure(exc, runner.log_path), runner.log_path) from None
        facts = overlay_mod.info(output, runner, step)
        backing = facts.get("full-backing-filename") or facts.get("backing-filename")
        if not backing or Path(backing).resolve() != layer.resolve():
            # Packer used a copy of the layer: point its overlay at the layer itself (same content, checked).
            runner.run(
                ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", layer.absolute(), output],
                step=f"{step} (rebase Packer's overlay)",
            )
        packer_overlay_size = output.stat().st_size
        runner.run(
            ["qemu-img", "commit", "-q", "-d", "-f", "qcow2", output],
            step=f"{step} (commit Packer's overlay)",
        )
        remove_tree(tree)
    return {"packer_version": ".".join(map(str, version)), "packer_overlay_size": packer_overlay_size}
