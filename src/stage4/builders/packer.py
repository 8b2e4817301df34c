"""The installer-driven builder: render a self-contained Packer template tree and run Packer on it.

`render_tree` writes what a site can use with Packer alone:

    base.json, base.pkrvars.hcl        the shared VM settings from [machine] (JSON for 1.6.x, HCL2)
    <release>-amd64.json               legacy template, builder named "qemu" (packer build -only=qemu ...)
    <release>-amd64.pkr.hcl            the HCL2 equivalent, from the same settings
    http/<release>/...                 the answer files Packer serves to the installer
    secrets/                           the build user's per-build SSH key and password (0600)

`build_base_with_packer` renders into a work directory, runs the Packer that is installed (JSON for
1.6.x, HCL2 for newer), and returns the qcow2 it made.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from stage4 import distributions
from stage4.builders import credentials as credentials_mod
from stage4.builders import packer_template
from stage4.builders.credentials import BuildCredentials
from stage4.builders.packer_iso import resolve_iso
from stage4.builders.packer_template import (
    Setting,
    TemplatePath,
    Var,
    Variable,
    to_hcl,
    to_json,
    var_file_hcl,
    var_file_json,
)
from stage4.config import ImageConfig, MachineConfig
from stage4.distributions.installer import HOSTNAME, AnswerContext
from stage4.errors import InputError
from stage4.machine.qemu_argv import CPU_MODEL_HELP, cpu_model
from stage4.runner import Runner

MIB = 1 << 20
DEFAULT_SSH_TIMEOUT = "60m"
OVMF = "/usr/share/ovmf/OVMF.fd"
DURATION_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


@dataclass(frozen=True)
class RenderTarget:
    """One release to render: the image's settings plus firmware, ISO and timeout choices."""

    image: ImageConfig
    efi: bool = False
    iso: str | None = None  # URL or local path; default: the catalog's
    iso_checksum: str | None = None  # sha256:<hex>, <hex>, file:<URL or path>, or a checksum file's path
    ssh_timeout: str | None = None  # how long Packer waits for the installed system; default: render_tree's

    @classmethod
    def of_image(
        cls,
        image: ImageConfig,
        *,
        efi: bool | None = None,
        iso: str | None = None,
        iso_checksum: str | None = None,
        ssh_timeout: str | None = None,
    ) -> RenderTarget:
        """The image's own efi, iso, iso_checksum and installer_timeout, each replaced by a given override.

        An overriding ISO comes with its own checksum (or none): the image's checksum belongs to its ISO.
        """
        if iso is None:
            iso, iso_checksum = image.iso, image.iso_checksum if iso_checksum is None else iso_checksum
        return cls(
            image,
            efi=image.efi if efi is None else efi,
            iso=iso,
            iso_checksum=iso_checksum,
            ssh_timeout=ssh_timeout or image.installer_timeout,
        )


def targets_for(
    names: list[str],
    images: dict[str, ImageConfig],
    *,
    overrides: dict[str, object] | None = None,
    efi: bool | None = None,
    iso: str | None = None,
    iso_checksum: str | None = None,
    ssh_timeout: str | None = None,
) -> list[RenderTarget]:
    """What `stage4 render NAME...` renders: each name is an image of the project file (with all its
    settings) or a distribution with default settings; `overrides` (image keys such as identifier) and the
    other arguments replace the image's own values."""
    if (iso or iso_checksum) and len(names) != 1:
        raise InputError("--iso and --iso-checksum apply to exactly one DISTRO")
    targets = []
    for name in names:
        if name in images:
            base = images[name].model_dump()
        elif name in distributions.names():
            base = {"distribution": name}
        else:
            raise InputError(
                f"{name!r} is neither an image of the project file nor a distribution; "
                f"distributions with an installer: {', '.join(distributions.installer_names())}"
            )
        try:
            image = ImageConfig.model_validate({**base, **(overrides or {})})
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(part) for part in error["loc"])
            shown = f" = {error['input']!r}" if error["loc"] and not isinstance(error["input"], dict) else ""
            raise InputError(f"{name}: {key}{shown}: {error['msg'].removeprefix('Value error, ')}") from None
        targets.append(
            RenderTarget.of_image(image, efi=efi, iso=iso, iso_checksum=iso_checksum, ssh_timeout=ssh_timeout)
        )
    return targets


@dataclass(frozen=True)
class RenderedTemplate:
    distribution: str
    stem: str  # e.g. "ubuntu-16.04-amd64"
    source_name: str  # the HCL2 source label, e.g. "ubuntu-16_04-amd64"
    json_template: Path
    hcl_template: Path
    output: Path  # the qcow2 Packer writes, relative to the tree (Packer runs in the tree)
    iso_url: str
    iso_checksum: str

    @property
    def tree(self) -> Path:
        return self.json_template.parent


def accelerator_value(accelerator: str) -> str:
    # Empty lets Packer choose: kvm where /dev/kvm exists, tcg elsewhere.
    return "" if accelerator in ("", "auto") else accelerator


def base_values(machine: MachineConfig, ssh_timeout: str | None = None) -> dict[str, Setting]:
    """The shared VM settings (base.json, [machine]): the role the original design gave base.json. The SSH
    timeout only when given (a layer's run): for installer runs it is each image's installer_timeout, so
    render_tree makes it a default in each template."""
    return {
        "cpus": machine.cpus,
        "memory": machine.memory // MIB,
        "disk_size": f"{machine.disk_size // MIB}M",
        "accelerator": accelerator_value(str(machine.accelerator)),
        "cpu_model": cpu_model(str(machine.accelerator)),
        "headless": True,
        **({"ssh_timeout": ssh_timeout} if ssh_timeout else {}),
    }


def _variables(
    base: Mapping[str, Setting], iso_url: str, iso_checksum: str, ssh_timeout: str
) -> list[Variable]:
    descriptions = {
        "cpus": ("number", "virtual CPUs of the installer VM"),
        "memory": ("number", "memory of the installer VM in MiB"),
        "disk_size": ("string", "virtual size of the image, e.g. 4096M"),
        "accelerator": ("string", "kvm or tcg; empty: kvm if /dev/kvm exists, else tcg"),
        "cpu_model": ("string", f"{CPU_MODEL_HELP} (EL 9 needs x86-64-v2)"),
        "headless": ("bool", "run qemu without a window"),
    }
    variables = packer_template.variables(base, descriptions)
    variables.append(
        Variable(
            "ssh_timeout",
            "string",
            ssh_timeout,
            "how long to wait for the installed system's SSH (the installer's run)",
        )
    )
    variables.append(Variable("iso_url", "string", iso_url, "installer ISO (URL or local path)"))
    variables.append(
        Variable("iso_checksum", "string", iso_checksum, "sha256:<hex> or file:<checksum file URL>")
    )
    return variables


def builder_settings(dist: type[distributions.Distribution], stem: str, efi: bool) -> dict[str, Setting]:
    """The one description of the qemu builder that both template formats are written from."""
    http_url = f"http://{{{{ .HTTPIP }}}}:{{{{ .HTTPPort }}}}/{dist.name}"
    qemuargs: list[list[Setting]] = [["-cpu", Var("cpu_model")]]
    if efi:
        # Packer 1.6.x has no efi_boot; OVMF as -bios works on every version (NVRAM is not kept).
        qemuargs.append(["-bios", OVMF])
    return {
        "type": "qemu",
        "name": "qemu",
        "iso_url": Var("iso_url"),
        "iso_checksum": Var("iso_checksum"),
        "output_directory": f"output-{stem}",
        "vm_name": f"{stem}.qcow2",
        "format": "qcow2",
        "disk_size": Var("disk_size"),
        "disk_interface": "virtio",
        "net_device": "virtio-net",
        "accelerator": Var("accelerator"),
        "cpus": Var("cpus"),
        "memory": Var("memory"),
        "headless": Var("headless"),
        "qemuargs": qemuargs,
        "vnc_bind_address": "127.0.0.1",
        "http_directory": TemplatePath("http"),
        "http_bind_address": "127.0.0.1",
        "boot_wait": dist.boot_wait,
        "boot_command": dist.boot_keys(efi, http_url),
        "communicator": "ssh",
        "ssh_username": "packer",
        "ssh_private_key_file": TemplatePath("secrets/build_key"),
        "ssh_timeout": Var("ssh_timeout"),
        "ssh_handshake_attempts": dist.ssh_handshake_attempts,
        "shutdown_command": "sudo -n shutdown -P now",
        "shutdown_timeout": "10m",
    }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def render_tree(
    out_dir: Path,
    targets: list[RenderTarget],
    machine: MachineConfig,
    runner: Runner,
    *,
    credentials: BuildCredentials | None = None,
    ssh_timeout: str = DEFAULT_SSH_TIMEOUT,
) -> list[RenderedTemplate]:
    """Write the Packer tree for `targets` into `out_dir`; new build credentials unless given.
    `ssh_timeout` is the default for targets without their own."""
    if not targets:
        raise InputError("nothing to render: name at least one distribution")
    plans = []
    for target in targets:  # check everything before writing anything
        timeout = target.ssh_timeout or ssh_timeout
        if not DURATION_RE.match(timeout) or timeout == "":
            raise InputError(f"ssh timeout {timeout!r}: expected a duration such as '60m' or '1h30m'")
        dist = distributions.get(target.image.distribution)
        if not dist.has_installer():
            raise InputError(
                f"{dist.name} has no installer in the catalog; build it with the bootstrap builder"
            )
        dist.check_filesystem(str(target.image.filesystem))
        dist.boot_keys(target.efi, "")
        plans.append((target, dist, timeout, *resolve_iso(dist, target.iso, target.iso_checksum)))

    out_dir.mkdir(parents=True, exist_ok=True)
    if credentials is None:
        credentials = credentials_mod.generate(out_dir / "secrets", runner)
    elif credentials.private_key_file.resolve() != (out_dir / "secrets" / "build_key").resolve():
        (out_dir / "secrets").mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(credentials.private_key_file, out_dir / "secrets" / "build_key")
        (out_dir / "secrets" / "build_key").chmod(0o600)

    base = base_values(machine)
    _write(out_dir / "base.json", var_file_json(base))
    _write(out_dir / "base.pkrvars.hcl", var_file_hcl(base))
    rendered = []
    for target, dist, timeout, iso_url, iso_checksum in plans:
        image = target.image
        context = AnswerContext(
            identifier=image.identifier,
            filesystem=str(image.filesystem),
            password_hash=credentials.password_hash,
            ssh_public_key=credentials.ssh_public_key,
            efi=target.efi,
            packages=tuple(image.packages),
            mirror=image.mirror,
            username=credentials.username,
            hostname=HOSTNAME,
        )
        for relative, text in dist.answer_files(context).items():
            _write(out_dir / "http" / dist.name / relative, text)
        stem = dist.template_name()
        source_name = stem.replace(".", "_")
        builder = builder_settings(dist, stem, target.efi)
        builder["ssh_username"] = credentials.username
        variables = _variables(base, iso_url, iso_checksum, timeout)
        description = (
            f"{dist.pretty_name}: installer-built Stage4 base image, generated by stage4.\n"
            f"Root partition: GPT name and {image.filesystem} label {image.identifier}; "
            f"firmware: {'UEFI' if target.efi else 'BIOS'}."
        )
        json_path = out_dir / f"{stem}.json"
        hcl_path = out_dir / f"{stem}.pkr.hcl"
        _write(json_path, to_json(builder, variables, description))
        _write(hcl_path, to_hcl(builder, variables, source_name, description))
        rendered.append(
            RenderedTemplate(
                dist.name,
                stem,
                source_name,
                json_path,
                hcl_path,
                Path(f"output-{stem}") / f"{stem}.qcow2",
                iso_url,
                iso_checksum,
            )
        )
    _write(out_dir / "README.txt", _readme(rendered))
    return rendered


def _readme(rendered: list[RenderedTemplate]) -> str:
    first = rendered[0]
    lines = [
        "Packer templates generated by `stage4 render`. Run Packer in this directory.",
        "",
        "Packer 1.6.x (legacy JSON templates, builder 'qemu'):",
        f"  packer build -only=qemu -var-file=base.json {first.json_template.name}",
        "Debug (waits for Enter after each step):",
        f"  PACKER_LOG=1 PACKER_LOG_PATH=packer.log packer build -debug -only=qemu -var-file=base.json "
        f"{first.json_template.name}",
        "",
        "Current Packer (HCL2; install the qemu plugin first: "
        "packer plugins install github.com/hashicorp/qemu):",
        f"  packer build -var-file=base.pkrvars.hcl {first.hcl_template.name}",
        "",
        "An ISO already on disk: add -var iso_url=/path/to.iso -var iso_checksum=sha256:<hex>.",
        "The image: output-<template>/<template>.qcow2. secrets/ holds this tree's build-user key and "
        "password;",
        "the build user 'packer' (passwordless sudo, key login) must be removed before an image is "
        "published.",
        "",
        "Templates: " + ", ".join(item.json_template.name for item in rendered),
    ]
    return "\n".join(lines) + "\n"
