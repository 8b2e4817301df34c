"""Taking the dev layer's results out without booting it: kernel, initramfs and component artifacts.

The dev overlay is attached read-only; the files are copied into a new artifacts folder, which the dev
manifest describes. The initramfs is checked with lsinitrd: its kernel modules must be those of the
image's kernel, and it must hold the configured dracut modules.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stage4.config import ImageConfig
from stage4.errors import StepFailed
from stage4.image.initrd import initramfs_facts
from stage4.runner import Runner

# Where the dev layer's roles leave their results, inside the layer.
OUT_IN_IMAGE = "/var/lib/stage4/out"
MODULE_INDEX = "modules-index.tar"


def extract(
    root: Path, image: ImageConfig, kernel: str, dest: Path, runner: Runner, step: str
) -> dict[str, Any]:
    """Copy the results out of the mounted dev layer at `root` into `dest`; returns what the dev manifest
    records of them (file names relative to `dest`)."""
    dest.mkdir(parents=True)
    if not (root / "lib/modules" / kernel).is_dir():
        raise StepFailed(step, f"the dev layer has no /lib/modules/{kernel}", runner.log_path)
    files: dict[str, Path] = {
        f"vmlinuz-{kernel}": root / "boot" / f"vmlinuz-{kernel}",
        f"initrd.img-{kernel}": root / OUT_IN_IMAGE.lstrip("/") / f"initrd.img-{kernel}",
    }
    components: dict[str, list[dict[str, Any]]] = {}
    for name, component in sorted(image.components.items()):
        components[name] = []
        for artifact in component.artifacts:
            relative = f"components/{name}/{artifact.path}"
            files[relative] = root / OUT_IN_IMAGE.lstrip("/") / relative
            components[name].append({**artifact.model_dump(mode="json"), "file": relative})
    # The kernel's module index as depmod made it with the artifacts installed (stage4_install_artifacts),
    # for the prod layer to reuse when its module tree is the same.
    index = root / OUT_IN_IMAGE.lstrip("/") / MODULE_INDEX
    has_index = index.is_file()
    if has_index:
        files[MODULE_INDEX] = index
    for relative, source in files.items():
        if not source.is_file():
            raise StepFailed(step, f"the dev layer has no {source.relative_to(root)}", runner.log_path)
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    initrd = dest / f"initrd.img-{kernel}"
    facts = initramfs_facts(initrd, runner, step)
    if facts["kernel_versions"] != [kernel]:
        raise StepFailed(
            step,
            f"the initramfs holds modules for {facts['kernel_versions'] or 'no kernel'}, "
            f"the image has kernel {kernel}",
            runner.log_path,
        )
    missing = [m for m in image.initramfs.dracut_modules if m not in facts["dracut_modules"]]
    if missing:
        raise StepFailed(step, f"the initramfs lacks the dracut modules {missing}", runner.log_path)
    return {
        "kernel_version": kernel,
        "kernel": f"vmlinuz-{kernel}",
        "initramfs": f"initrd.img-{kernel}",
        "initramfs_dracut_modules": facts["dracut_modules"],
        "components": components,
        "module_index": MODULE_INDEX if has_index else None,
        "files": sorted(files),
    }
