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

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from stage4 import distributions
from stage4.builders import credentials as credentials_mod
from stage4.builders import packer_template
from stage4.builders.credentials import BuildCredentials
from stage4.builders.packer_template import (
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
from stage4.errors import InputError, StepFailed
from stage4.machine.qemu_argv import cpu_model
from stage4.runner import Runner

MIB = 1 << 20
DEFAULT_SSH_TIMEOUT = "60m"
# Packer >= 1.7 reads HCL2 natively (and has packer init); older ones get the legacy JSON template.
FIRST_HCL_VERSION = (1, 7, 0)
# Packer >= 1.10 ships no plugins: the qemu plugin must be installed.
FIRST_UNBUNDLED_VERSION = (1, 10, 0)
OVMF = "/usr/share/ovmf/OVMF.fd"
DURATION_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")
HASH_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}


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


# ----- ISO and checksum ---------------------------------------------------------------------------


def _is_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https", "ftp")


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_from_file(sums: Path, iso_name: str) -> str:
    """Find `iso_name` in a GNU (`<hex>  name`) or BSD (`SHA256 (name) = <hex>`) checksum file."""
    try:
        text = sums.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read checksum file {sums}: {exc.strerror}") from None
    for line in text.splitlines():
        bsd = re.match(r"^\s*(MD5|SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$", line)
        if bsd and Path(bsd.group(2)).name == iso_name:
            return f"{bsd.group(1).lower()}:{bsd.group(3).lower()}"
        gnu = re.match(r"^\s*([0-9A-Fa-f]+)\s+\*?(.+?)\s*$", line)
        if gnu and Path(gnu.group(2)).name == iso_name and len(gnu.group(1)) in HASH_LENGTHS:
            return f"{HASH_LENGTHS[len(gnu.group(1))]}:{gnu.group(1).lower()}"
    raise InputError(f"checksum file {sums} has no entry for {iso_name}")


def _literal_checksum(text: str) -> str | None:
    """'sha256:<hex>' or a bare hex digest as '<algorithm>:<hex>'; None if it is neither."""
    match = re.fullmatch(r"(?:(md5|sha1|sha256|sha512):)?([0-9A-Fa-f]+)", text.strip())
    if not match:
        return None
    algorithm, digest = match.group(1), match.group(2).lower()
    expected = HASH_LENGTHS.get(len(digest))
    if expected is None or (algorithm and algorithm != expected):
        raise InputError(
            f"iso checksum {text!r}: a {algorithm or 'hex'} digest of {len(digest)} digits is not valid"
        )
    return f"{expected}:{digest}"


def resolve_iso(
    dist: type[distributions.Distribution], iso: str | None, checksum: str | None
) -> tuple[str, str]:
    """The `iso_url` and `iso_checksum` for Packer. A checksum is always required and never 'none'.

    A local ISO is verified here (a clear error beats Packer's), against a literal digest or its line in
    a local checksum file; a remote checksum file is left for Packer to download and check.
    """
    if checksum is not None and checksum.strip().lower() in ("", "none"):
        raise InputError("iso checksum 'none' is not accepted: stage4 always verifies the installer ISO")
    if iso is None:
        if checksum is None:
            return dist.iso_url, dist.iso_checksum
        iso = dist.iso_url
    elif checksum is None:
        raise InputError(f"{dist.name}: give the checksum of {iso} (sha256:<hex> or a checksum file)")

    literal = _literal_checksum(checksum)
    sums_source = None
    if literal is None:
        sums_source = checksum[5:] if checksum.startswith("file:") else checksum
        if sums_source.startswith("file://"):
            sums_source = sums_source[7:]

    if _is_url(iso):
        if literal:
            return iso, literal
        if _is_url(sums_source):
            return iso, f"file:{sums_source}"
        sums = Path(sums_source).expanduser()
        if not sums.is_file():
            raise InputError(f"checksum file {sums} does not exist")
        return iso, checksum_from_file(sums, Path(urlsplit(iso).path).name)

    path = Path(iso).expanduser().absolute()
    if not path.is_file():
        raise InputError(f"{dist.name}: ISO {path} does not exist")
    if literal is None:
        if _is_url(sums_source):
            return str(path), f"file:{sums_source}"
        sums = Path(sums_source).expanduser()
        if not sums.is_file():
            raise InputError(f"checksum file {sums} does not exist")
        literal = checksum_from_file(sums, path.name)
    algorithm, expected = literal.split(":", 1)
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise InputError(
            f"checksum mismatch for {path}: expected {algorithm} {expected}, the file has {actual}"
        )
    return str(path), literal


# ----- rendering ----------------------------------------------------------------------------------


def _accelerator_value(accelerator: str) -> str:
    # Empty lets Packer choose: kvm where /dev/kvm exists, tcg elsewhere.
    return "" if accelerator in ("", "auto") else accelerator


def base_values(machine: MachineConfig, ssh_timeout: str | None = None) -> dict[str, object]:
    """The shared VM settings (base.json, [machine]): the role the original design gave base.json. The SSH
    timeout only when given (a layer's run): for installer runs it is each image's installer_timeout, so
    render_tree makes it a default in each template."""
    return {
        "cpus": machine.cpus,
        "memory": machine.memory // MIB,
        "disk_size": f"{machine.disk_size // MIB}M",
        "accelerator": _accelerator_value(str(machine.accelerator)),
        "cpu_model": cpu_model(str(machine.accelerator)),
        "headless": True,
        **({"ssh_timeout": ssh_timeout} if ssh_timeout else {}),
    }


def _variables(base: dict[str, object], iso_url: str, iso_checksum: str, ssh_timeout: str) -> list[Variable]:
    descriptions = {
        "cpus": ("number", "virtual CPUs of the installer VM"),
        "memory": ("number", "memory of the installer VM in MiB"),
        "disk_size": ("string", "virtual size of the image, e.g. 4096M"),
        "accelerator": ("string", "kvm or tcg; empty: kvm if /dev/kvm exists, else tcg"),
        "cpu_model": ("string", "qemu -cpu: host under KVM, max under TCG (EL 9 needs x86-64-v2)"),
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


def builder_settings(dist: type[distributions.Distribution], stem: str, efi: bool) -> dict[str, object]:
    """The one description of the qemu builder that both template formats are written from."""
    http_url = f"http://{{{{ .HTTPIP }}}}:{{{{ .HTTPPort }}}}/{dist.name}"
    qemuargs: list[list[object]] = [["-cpu", Var("cpu_model")]]
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


# ----- running Packer -----------------------------------------------------------------------------


def packer_version(runner: Runner, env: dict[str, str] | None = None) -> tuple[int, int, int]:
    result = runner.run(["packer", "version"], step="packer version", capture=True, env=env)
    match = re.search(r"Packer v?(\d+)\.(\d+)\.(\d+)", result.stdout)
    if not match:
        raise StepFailed("packer version", f"cannot read the version from {result.stdout.strip()[:80]!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


# Packer 1.6.x runs `qemu-img create -f qcow2 -b BASE OUT SIZE` for use_backing_file without -F, which
# qemu >= 6.1 rejects ("Backing file specified without backing format"). The wrapper, first in PATH,
# adds `-F qcow2` to such calls and passes everything else through.
_QEMU_IMG_WRAPPER = """#!/bin/sh
# Written by stage4: adds the backing format that Packer 1.6.x leaves out (qemu >= 6.1 needs it).
real={real}
if [ "$1" = create ]; then
    backing=no
    format=no
    for arg in "$@"; do
        case "$arg" in
            -b|-b?*) backing=yes ;;
            -F|-F?*) format=yes ;;
            *backing_fmt=*) format=yes ;;
        esac
    done
    if [ "$backing" = yes ] && [ "$format" = no ]; then
        shift
        exec "$real" create -F qcow2 "$@"
    fi
fi
exec "$real" "$@"
"""


def qemu_img_wrapper(directory: Path) -> Path:
    """Write the qemu-img wrapper into `directory` (to be put first in PATH); returns the directory."""
    real = shutil.which("qemu-img")
    if real is None:
        raise StepFailed("packer build", "command not found: qemu-img (run ./install.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "qemu-img"
    wrapper.write_text(_QEMU_IMG_WRAPPER.format(real="'" + real.replace("'", "'\\''") + "'"))
    wrapper.chmod(0o755)
    return directory


def packer_env(tree: Path, cache_dir: Path, debug: bool) -> dict[str, str]:
    env = {
        "CHECKPOINT_DISABLE": "1",
        "PACKER_CACHE_DIR": str(cache_dir),
        "PACKER_NO_COLOR": "1",
        "PATH": f"{qemu_img_wrapper(tree / '.bin')}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    if debug:
        env["PACKER_LOG"] = "1"
        env["PACKER_LOG_PATH"] = str(tree / "packer.log")
    return env


def _check_plugin(runner: Runner, env: dict[str, str]) -> None:
    result = runner.run(
        ["packer", "plugins", "installed"], step="packer plugins", capture=True, env=env, check=False
    )
    if "qemu" not in result.stdout:
        raise StepFailed(
            "packer build",
            "this Packer has no qemu plugin; install it with "
            "`packer plugins install github.com/hashicorp/qemu` "
            "(or use Debian's packer 1.6.6, which has it built in)",
        )


def build_argv(
    template: RenderedTemplate, version: tuple[int, int, int], accelerator: str, only: str | None = None
) -> list[str]:
    """`packer build` for this Packer: the legacy JSON template (builder `qemu`) before 1.7, else HCL2."""
    if version < FIRST_HCL_VERSION:
        argv = ["packer", "build", "-color=false", f"-only={only or 'qemu'}", "-var-file=base.json"]
        template_file = template.json_template.name
    else:
        argv = [
            "packer",
            "build",
            "-color=false",
            f"-only={only or 'qemu.' + template.source_name}",
            "-var-file=base.pkrvars.hcl",
        ]
        template_file = template.hcl_template.name
    return [
        *argv,
        f"-var=accelerator={_accelerator_value(accelerator)}",
        f"-var=cpu_model={cpu_model(accelerator)}",
        template_file,
    ]


def run_packer_build(
    template: RenderedTemplate,
    runner: Runner,
    *,
    version: tuple[int, int, int],
    accelerator: str = "",
    cache_dir: Path | None = None,
    debug: bool = False,
    only: str | None = None,
    label: str | None = None,
) -> Path:
    """Run Packer on a rendered template and return the qcow2 it wrote.

    Packer exits 0 when `-only` matches no builder (a typo builds nothing), so the result is checked:
    no qcow2, no success. The installer's run is bounded by the template's ssh_timeout.
    """
    tree = template.tree
    env = packer_env(tree, cache_dir or tree / "packer_cache", debug)
    step = f"packer build {label or template.distribution}"
    if version >= FIRST_UNBUNDLED_VERSION:
        _check_plugin(runner, env)
    argv = build_argv(template, version, accelerator, only)
    output = tree / template.output
    if output.parent.exists():
        shutil.rmtree(output.parent)  # Packer refuses to start when the output directory exists
    runner.run(argv, step=step, env=env, cwd=tree)
    if not output.is_file():
        selected = argv[3].removeprefix("-only=")
        raise StepFailed(
            step,
            f"Packer finished without building anything (no {template.output}): "
            f"does -only={selected} name a builder of {argv[-1]}?",
            runner.log_path,
        )
    return output


def build_base_with_packer(
    name: str,
    image: ImageConfig,
    machine: MachineConfig,
    work_dir: Path,
    runner: Runner,
    accelerator: str,
    iso: str | Path | None = None,
    iso_checksum: str | None = None,
    debug: bool = False,
    *,
    efi: bool = False,
    ssh_timeout: str = DEFAULT_SSH_TIMEOUT,
    cache_dir: Path | None = None,
) -> Path:
    """Install `image`'s distribution from its ISO with Packer; return the qcow2 (inside `work_dir`).

    Renders into `work_dir/packer` with fresh build credentials, picks the template format the installed
    Packer reads, and runs it with CHECKPOINT_DISABLE=1, PACKER_CACHE_DIR (`cache_dir`, e.g. the
    project's cache, so ISOs are downloaded once) and, with `debug`, PACKER_LOG into
    work_dir/packer/packer.log.
    (Packer's own -debug pauses for Enter after every step, so it is left to interactive use.)
    """
    tree = work_dir / "packer"
    if tree.exists():
        shutil.rmtree(tree)
    target = RenderTarget(
        image,
        efi=efi,
        iso=None if iso is None else str(iso),
        iso_checksum=iso_checksum,
        ssh_timeout=ssh_timeout,
    )
    [template] = render_tree(tree, [target], machine, runner)
    version = packer_version(runner, env={"CHECKPOINT_DISABLE": "1"})
    return run_packer_build(
        template,
        runner,
        version=version,
        accelerator=accelerator,
        cache_dir=cache_dir,
        debug=debug,
        label=name,
    )
