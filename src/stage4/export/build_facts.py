"""What the build says about an image: its stage4 manifest, and the dracut modules of its initramfs.

A manifest beside the image (`prod.qcow2` -> `prod.json`, `base.qcow2` -> `base.json`) carries the build
identity. The manifest of a layered image (the prod layer) also names the kernel and initramfs the dev run
built, the root partition identifier and the dracut modules the initramfs was configured with: export
publishes exactly those files and takes the identifier from there instead of guessing it from the image.
An initramfs that lacks a configured dracut module would not boot the image, so it is refused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from stage4 import manifest as build_manifest
from stage4.config.components import SHIPPED_STAGE3_MODULE
from stage4.errors import InputError, StepFailed
from stage4.runner import Runner

# dracut records the modules an initramfs was built with in this file (what lsinitrd's header shows).
DRACUT_MODULE_LIST = "usr/lib/dracut/modules.txt"
BOOT_KEYS = ("kernel", "initramfs")


@dataclass(frozen=True)
class BuildFacts:
    path: Path
    identity: str | None
    identifier: str | None = None
    kernel: Path | None = None
    initramfs: Path | None = None
    kernel_version: str | None = None
    dracut_modules: tuple[str, ...] = ()

    @property
    def has_boot_files(self) -> bool:
        return self.kernel is not None


def manifest_beside(image: Path) -> Path | None:
    """The manifest beside `image`, if there is one."""
    manifest = build_manifest.beside(image)
    return manifest if manifest.is_file() else None


def read(path: Path, image: Path | None = None) -> BuildFacts:
    """The facts export uses from a stage4 manifest; InputError naming the file and key if one is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"manifest {path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"manifest {path}: not a JSON object")
    identity = data.get("identity") if isinstance(data.get("identity"), str) else None
    if not any(key in data for key in BOOT_KEYS):
        return BuildFacts(Path(path), identity)  # a base image's manifest: identity only

    def text(key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise InputError(
                f"manifest {path}: key {key!r} = {value!r}: expected a non-empty string "
                "(rebuild the image with this stage4, or pass --kernel and --initrd)"
            )
        return value

    files = {}
    for key in BOOT_KEYS:
        file = Path(text(key))
        if not file.is_absolute() or not file.is_file():
            raise InputError(f"manifest {path}: {key} {file}: no such file (rebuild the image)")
        files[key] = file
    modules = data.get("dracut_modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise InputError(
            f"manifest {path}: key 'dracut_modules' = {modules!r}: expected a list of module "
            "names (rebuild the image with this stage4)"
        )
    recorded = (data.get("image") or {}).get("size") if isinstance(data.get("image"), dict) else None
    if image is not None and isinstance(recorded, int) and recorded != Path(image).stat().st_size:
        raise InputError(
            f"manifest {path} describes an image of {recorded} bytes, {image} has "
            f"{Path(image).stat().st_size}: not the manifest of this image"
        )
    return BuildFacts(
        Path(path),
        identity,
        text("identifier"),
        files["kernel"],
        files["initramfs"],
        text("kernel_version"),
        tuple(modules),
    )


def dracut_modules(initramfs: Path, runner: Runner) -> list[str]:
    """The dracut modules `initramfs` was built with, as dracut recorded them (lsinitrd -f modules.txt)."""
    step = f"list the dracut modules of {initramfs}"
    if shutil.which("lsinitrd") is None:
        raise StepFailed(step, "lsinitrd not found on the host (install dracut-core: ./install.sh)")
    result = runner.run(
        ["lsinitrd", "-f", DRACUT_MODULE_LIST, initramfs], step=step, capture=True, check=False
    )
    if result.returncode != 0:
        raise InputError(f"initramfs {initramfs}: lsinitrd cannot read it (exit {result.returncode})")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def check_dracut_modules(initramfs: Path, wanted: tuple[str, ...], runner: Runner) -> None:
    """Refuse an initramfs that lacks one of the configured dracut modules."""
    if not wanted:
        return
    found = dracut_modules(initramfs, runner)
    missing = [module for module in wanted if module not in found]
    if missing:
        names = ", ".join(repr(m) for m in missing)
        why = "" if found else f" (it has no {DRACUT_MODULE_LIST}: not built by dracut?)"
        plural = "s" if len(missing) > 1 else ""
        raise InputError(
            f"initramfs {initramfs} lacks the configured dracut module{plural} {names}{why}; "
            "nothing published"
        )


def stage3_warning(initramfs: Path, origin: str, runner: Runner) -> str | None:
    """Why a Stage4 client could not boot with `initramfs` (from `origin`), or None when it has stage 3.

    An image's own /boot initramfs (a base image exported alone) is a plain one: the revision is still
    published, as DNBD3 also serves images that clients run in a VM, but the admin is told."""
    try:
        found = dracut_modules(initramfs, runner)
    except InputError:
        found = []  # not a dracut initramfs at all
    except StepFailed as exc:  # no lsinitrd here: a warning must not stop the export
        return f"the initrd ({origin}) was not checked for the {SHIPPED_STAGE3_MODULE} dracut module: {exc}"
    if SHIPPED_STAGE3_MODULE in found:
        return None
    return (
        f"the initrd ({origin}) has no {SHIPPED_STAGE3_MODULE} dracut module: a Stage4 client cannot boot "
        "this revision over DNBD3 (export a layered build's prod image beside its prod.json, or give "
        "--initrd)"
    )
