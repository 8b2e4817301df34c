"""Running Packer on a rendered template tree: which Packer is installed (JSON templates for 1.6.x,
HCL2 for newer), its environment and plugins, the build, and the qcow2 it made."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from stage4.builders.packer import (
    DEFAULT_SSH_TIMEOUT,
    RenderedTemplate,
    RenderTarget,
    accelerator_value,
    render_tree,
)
from stage4.config import ImageConfig, MachineConfig
from stage4.errors import StepFailed
from stage4.machine.qemu_argv import cpu_model
from stage4.runner import Runner

# Packer >= 1.7 reads HCL2 natively (and has packer init); older ones get the legacy JSON template.
FIRST_HCL_VERSION = (1, 7, 0)
# Packer >= 1.10 ships no plugins: the qemu plugin must be installed.
FIRST_UNBUNDLED_VERSION = (1, 10, 0)


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
        f"-var=accelerator={accelerator_value(accelerator)}",
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
