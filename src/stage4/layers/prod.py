"""The prod step: a fresh qcow2 overlay on the base with what the dev run built, flattened for export.

Nothing of the dev layer goes in but its artifacts: first the kernel packages are held (the dev run built
the initramfs and the modules for that kernel), then the components' runtime packages, the artifacts
(modules with depmod, files at their destinations), the desktop and the mltk modules if configured, the
user's prod playbooks, then the shipped cleanup role. A layer whose kernels are not exactly the dev run's
fails (kernel_guard.py); else the overlay is flattened into one standalone zstd qcow2 (what xloop reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stage4.config import ImageConfig, LayerConfig
from stage4.fsutil import file_facts, place_atomically, remove_tree, temporary_sibling
from stage4.image import overlay
from stage4.layers import identities, kernel_guard
from stage4.layers.dev import ARTIFACTS_DIR, installs, packages_of
from stage4.layers.layer_steps import (
    base_root_partition,
    check_playbooks,
    fresh_work_dir,
    kernel_of,
    provision_layer,
)
from stage4.mltk import plan as mltk_plan
from stage4.provisioning import ansible, attach
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context

PROD_IMAGE = "prod.qcow2"


def identity(image: ImageConfig, base_manifest: dict, dev_manifest: dict) -> str:
    return identities.prod_identity(image, base_manifest["identity"], dev_manifest["identity"])


def build(ctx: Context, prod_id: str, base_manifest: dict, dev_manifest: dict) -> dict:
    """Build and flatten the prod layer into prod.qcow2; returns the prod part of its manifest."""
    layer = ctx.image.prod or LayerConfig()
    check_playbooks(ctx, "prod", layer)
    display, runner = ctx.runner.display, ctx.runner
    kernel = dev_manifest.get("kernel_version") or kernel_of(base_manifest)
    artifacts = dev_manifest["artifacts"]
    artifacts_dir = ctx.image_dir / ARTIFACTS_DIR
    work = fresh_work_dir(ctx, "prod")
    timings: dict[str, float] = {}
    try:
        overlay_path = work / "prod-overlay.qcow2"
        overlay.create(
            ctx.image_dir / base_manifest["image"]["file"],
            overlay_path,
            runner,
            f"{ctx.name}: prod: create overlay",
        )
        to_install = installs(
            [a for name in sorted(artifacts["components"]) for a in artifacts["components"][name]],
            f"{artifacts_dir}/",
        )
        runtime = sorted({p for c in ctx.image.components.values() for p in c.runtime_packages})
        # mltk's REQUIRED_CONTENT_PACKAGES: real packages here (the image is a real distribution).
        mltk = artifacts.get("mltk")
        runtime = sorted({*runtime, *(mltk["content_packages"] if mltk else ())})
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": kernel,
            "stage4_packages": sorted({*layer.packages, *runtime}),
            "stage4_artifacts": to_install,
            "stage4_mltk": mltk_plan.install_vars(mltk, artifacts_dir),
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
            [ansible.play("stage4 prod: cleanup", ["stage4_cleanup"], gather_facts=False)],
        )
        with timed(timings, "provision"):
            provision_layer(ctx, base_manifest, "prod", layer, overlay_path, plays, variables, work)
        step = f"{ctx.name}: prod: kernel and package list"
        with attach.attached(
            overlay_path,
            base_root_partition(ctx, base_manifest),
            work / "attach",
            runner,
            writable=False,
            step=step,
        ) as root:
            kernel_guard.check(root, kernel, step, runner, base_manifest.get("kernel_versions"))
            packages, kernel_hold = packages_of(root, runner), kernel_guard.hold(root, runner)
        target = ctx.image_dir / PROD_IMAGE
        step = f"{ctx.name}: prod: flatten into a standalone qcow2"
        with temporary_sibling(target) as partial, display.step(step), timed(timings, "flatten"):
            facts = overlay.flatten(overlay_path, partial, runner, step)
            place_atomically(partial, target)
    finally:
        remove_tree(work)
    files = file_facts(ctx.image_dir, PROD_IMAGE)
    return {
        "dev_identity": dev_manifest["identity"],
        "way": layer.way.value,
        "kernel_version": kernel,
        # What export publishes beside the image: the dev run's kernel and initramfs, not the base's.
        "kernel": str(artifacts_dir / artifacts["kernel"]),
        "initramfs": str(artifacts_dir / artifacts["initramfs"]),
        "dracut_modules": list(ctx.image.initramfs.dracut_modules),
        "playbooks": [str(p) for p in layer.playbooks],
        "desktop": ctx.image.desktop.model_dump(mode="json") if ctx.image.desktop else None,
        "packages_requested": variables["stage4_packages"],
        "artifacts_installed": to_install,
        "packages": packages,
        "kernel_hold": kernel_hold,
        "image": {
            "file": PROD_IMAGE,
            "format": "qcow2",
            "compat": "1.1",
            "compression": "zstd",
            "virtual_size": facts["virtual-size"],
            **files[PROD_IMAGE],
        },
        "files": files,
        "timings_seconds": timings,
    }
