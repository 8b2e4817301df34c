"""The prod step: a fresh qcow2 overlay on the base with what the dev run built, flattened for export.

Nothing of the dev layer goes in but its artifacts: first the kernel packages are held (the dev run built
the initramfs and the modules for that kernel), then the components' runtime packages and what the
dracut modules need in the booted system (dnbd3-rootfs: dmsetup), the artifacts in one archive (modules
with the dev layer's module index, or depmod where the module tree differs; files at their destinations),
the desktop and the mltk modules if configured, the user's prod playbooks, then the shipped cleanup role.
A layer whose kernels are not exactly the dev run's fails (kernel_guard.py); else the overlay is
flattened into one standalone zstd qcow2 (what xloop reads).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage4.config import ImageConfig
from stage4.fsutil import file_facts, place_atomically, temporary_sibling
from stage4.image import overlay
from stage4.layers import identities, kernel_guard
from stage4.layers.dev import ARTIFACTS_DIR, installs, packages_of
from stage4.layers.layer_run import LayerRun
from stage4.layers.layer_steps import kernel_of
from stage4.mltk import plan as mltk_plan
from stage4.provisioning import ansible
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context

PROD_IMAGE = "prod.qcow2"
ARTIFACTS_SCRIPT = ansible.ROLES_DIR / "stage4_install_artifacts/files/artifacts.sh"


def identity(image: ImageConfig, base_manifest: dict[str, Any], dev_manifest: dict[str, Any]) -> str:
    return identities.prod_identity(image, base_manifest["identity"], dev_manifest["identity"])


def build(
    ctx: Context, prod_id: str, base_manifest: dict[str, Any], dev_manifest: dict[str, Any]
) -> dict[str, Any]:
    """Build and flatten the prod layer into prod.qcow2; returns the prod part of its manifest."""
    return ProdRun(ctx, base_manifest, dev_manifest).run()


class ProdRun(LayerRun):
    name, overlay_file = "prod", "prod-overlay.qcow2"

    def __init__(self, ctx: Context, base_manifest: dict[str, Any], dev_manifest: dict[str, Any]) -> None:
        super().__init__(ctx, ctx.image.prod, base_manifest)
        self.dev_manifest = dev_manifest
        self.kernel: str = dev_manifest.get("kernel_version") or kernel_of(base_manifest)
        self.artifacts: dict[str, Any] = dev_manifest["artifacts"]
        self.artifacts_dir = ctx.image_dir / ARTIFACTS_DIR
        self.to_install: list[dict[str, Any]] = []
        self.packages_requested: list[str] = []
        self.packages: dict[str, str] = {}
        self.kernel_hold: dict[str, Any] = {}
        self.flattened: dict[str, Any] = {}

    def sub_steps(self) -> list[Callable[[], None]]:
        return [
            self.create_overlay,
            self.provision,
            self.check_kernel,
            self.flatten,
        ]

    def provision(self) -> None:
        """Kernel hold, runtime packages, artifacts, desktop, mltk modules, the user's playbooks, cleanup."""
        ctx, layer, artifacts = self.ctx, self.layer, self.artifacts
        self.to_install = installs(
            [a for name in sorted(artifacts["components"]) for a in artifacts["components"][name]],
            f"{self.artifacts_dir}/",
            self.kernel,
        )
        index = self.artifacts_dir / artifacts["module_index"] if artifacts.get("module_index") else None
        installer = self.work / "artifacts.sh"
        if self.to_install:
            write_artifacts_installer(self.to_install, index, installer)
        runtime = {p for c in ctx.image.components.values() for p in c.runtime_packages}
        # mltk's REQUIRED_CONTENT_PACKAGES: real packages here (the image is a real distribution), and
        # busybox when the modules' scripts need its ash.
        mltk = artifacts.get("mltk")
        runtime |= set([*mltk["content_packages"], *mltk_plan.runtime_packages(mltk)] if mltk else ())
        self.packages_requested = sorted({*layer.packages, *runtime})
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": self.kernel,
            "stage4_packages": self.packages_requested,
            # what the initramfs's modules need in the booted system (the stage4_packages role's map)
            "stage4_dracut_modules": list(ctx.image.initramfs.dracut_modules),
            "stage4_artifacts_installer": str(installer) if self.to_install else "",
            "stage4_mltk": mltk_plan.install_vars(mltk, self.artifacts_dir),
        }
        roles = ["stage4_kernel_hold", "stage4_packages", "stage4_install_artifacts"]
        if desktop := ctx.image.desktop:
            roles.append("stage4_desktop")
            variables |= {
                "stage4_desktop_session": desktop.session.value,
                "stage4_desktop_browser": desktop.browser,
            }
        if mltk:
            roles.append("stage4_mltk_install")
        plays = ansible.site(
            [ansible.play("stage4 prod: packages, artifacts, desktop, mltk modules", roles)],
            list(layer.playbooks),
            [ansible.play("stage4 prod: cleanup", ["stage4_cleanup"])],
        )
        self.provision_with(plays, variables)

    def check_kernel(self) -> None:
        """The layer's kernels are exactly the dev run's (kernel_guard.py); the package list is read."""
        step = self.step("kernel and package list")
        with self.attached_read_only(step) as root:
            kernel_guard.check(
                root, self.kernel, step, self.runner, self.base_manifest.get("kernel_versions")
            )
            self.packages = packages_of(root, self.runner)
            self.kernel_hold = kernel_guard.hold(root, self.runner)

    def flatten(self) -> None:
        """The overlay and its base as one standalone zstd qcow2: prod.qcow2."""
        target = self.ctx.image_dir / PROD_IMAGE
        step = self.step("flatten into a standalone qcow2")
        with (
            temporary_sibling(target) as partial,
            self.runner.display.step(step),
            timed(self.timings, "flatten"),
        ):
            self.flattened = overlay.flatten(self.overlay, partial, self.runner, step)
            place_atomically(partial, target)

    def manifest(self) -> dict[str, Any]:
        ctx, layer, artifacts_dir = self.ctx, self.layer, self.artifacts_dir
        files = file_facts(ctx.image_dir, PROD_IMAGE)
        return {
            "dev_identity": self.dev_manifest["identity"],
            "way": layer.way.value,
            "kernel_version": self.kernel,
            # What export publishes beside the image: the dev run's kernel and initramfs, not the base's.
            "kernel": str(artifacts_dir / self.artifacts["kernel"]),
            "initramfs": str(artifacts_dir / self.artifacts["initramfs"]),
            "dracut_modules": list(ctx.image.initramfs.dracut_modules),
            "playbooks": [str(p) for p in layer.playbooks],
            "desktop": ctx.image.desktop.model_dump(mode="json") if ctx.image.desktop else None,
            "packages_requested": self.packages_requested,
            "artifacts_installed": self.to_install,
            "packages": self.packages,
            "kernel_hold": self.kernel_hold,
            "image": {
                "file": PROD_IMAGE,
                "format": "qcow2",
                "compat": "1.1",
                "compression": "zstd",
                "virtual_size": self.flattened["virtual-size"],
                **files[PROD_IMAGE],
            },
            "files": files,
            "timings_seconds": self.timings,
        }


def write_artifacts_installer(to_install: list[dict[str, Any]], index: Path | None, target: Path) -> None:
    """The role's artifacts.sh with the archive of the prod layer's artifacts appended after the line
    __STAGE4_ARCHIVE__, for `artifacts.sh unpack`: one transfer into the layer, no Python started there.
    Each file is under files/ at its destination with its mode, owned by root, without folder entries (the
    image's folders keep their modes); the dev layer's module index is modules-index.tar."""

    def add(archive: tarfile.TarFile, source: Path, name: str, mode: int) -> None:
        info = tarfile.TarInfo(name)
        stat = source.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), mode
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with source.open("rb") as data:
            archive.addfile(info, data)

    with target.open("wb") as out:
        out.write(ARTIFACTS_SCRIPT.read_bytes() + b"__STAGE4_ARCHIVE__\n")
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
            for artifact in to_install:
                name = "files/" + os.path.normpath(artifact["dest"]).lstrip("/")
                add(archive, Path(artifact["src"]), name, int(artifact["mode"], 8))
            if index:
                add(archive, index, "modules-index.tar", 0o600)
    target.chmod(0o755)
