"""The dev step: a throw-away qcow2 overlay on the base where the components and the initramfs are built.

Order in the layer: the user's dev packages and playbooks, the components (built, then installed into
the layer itself: modules into /lib/modules/KVER/extra with depmod, tools to their destinations), then
the initramfs for the image's kernel, so dracut modules can take the components in. The kernel, the
initramfs and the artifacts are copied out without booting the layer (artifacts/), and the layer is
deleted (kept as dev.qcow2 with --keep-dev).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from stage4.builders.bootstrap import installed_packages
from stage4.config import ImageConfig, LayerConfig
from stage4.fsutil import file_facts, place_atomically, remove_tree, temporary_sibling
from stage4.image import overlay
from stage4.layers import extract, identities
from stage4.layers.extract import OUT_IN_IMAGE
from stage4.layers.layer_steps import (
    base_root_partition,
    check_playbooks,
    fresh_work_dir,
    kernel_of,
    provision_layer,
)
from stage4.mltk import plan as mltk_plan
from stage4.provisioning import ansible, attach, sources
from stage4.runner import Runner
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context

DEV_IMAGE, ARTIFACTS_DIR = "dev.qcow2", "artifacts"


def identity(image: ImageConfig, base_manifest: dict) -> str:
    return identities.dev_identity(image, base_manifest["identity"], kernel_of(base_manifest))


def installs(artifacts: list[dict], prefix: str) -> list[dict]:
    """What the install role needs of each artifact; `prefix` locates the files (host or layer)."""
    return [
        {"src": prefix + a["file"], "kind": a["kind"], "dest": a["dest"], "mode": a["mode"]}
        for a in artifacts
    ]


def build(ctx: Context, dev_id: str, base_manifest: dict) -> dict:
    """Build, extract and discard the dev layer; returns the dev part of its manifest."""
    layer = ctx.image.dev or LayerConfig()
    check_playbooks(ctx, "dev", layer)
    display, runner, kernel = ctx.runner.display, ctx.runner, kernel_of(base_manifest)
    work = fresh_work_dir(ctx, "dev")
    timings: dict[str, float] = {}
    try:
        overlay_path = work / DEV_IMAGE
        step = f"{ctx.name}: dev: fetch sources"
        with display.step(step), timed(timings, "sources"):
            components = []
            for name, component in sorted(ctx.image.components.items()):
                tarball = sources.fetch(
                    name, component.source, work / "sources", runner, f"{step} ({name})", ctx.cache_dir
                )
                components.append(
                    {
                        "name": name,
                        "tarball": str(tarball),
                        "build": list(component.build),
                        "artifacts": [a.model_dump(mode="json") for a in component.artifacts],
                        "build_packages": list(component.build_packages),
                    }
                )
            initramfs_tar = sources.fetch(
                "stage4-initramfs",
                ctx.image.initramfs.effective_source,
                work / "sources",
                runner,
                f"{step} (initramfs)",
                ctx.cache_dir,
            )
            has_script = "build-initramfs.sh" in sources.top_level(initramfs_tar)
            # mltk modules are read and ordered here: a bad module name stops the build before the layer.
            mltk = mltk_plan.prepare(ctx, work / "sources", step) if ctx.image.mltk else None
        overlay.create(
            ctx.image_dir / base_manifest["image"]["file"],
            overlay_path,
            runner,
            f"{ctx.name}: dev: create overlay",
        )
        in_layer = [
            {"file": f"components/{name}/{artifact.path}", **artifact.model_dump(mode="json")}
            for name, component in sorted(ctx.image.components.items())
            for artifact in component.artifacts
        ]
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": kernel,
            "stage4_out": OUT_IN_IMAGE,
            "stage4_packages": list(layer.packages),
            "stage4_components": components,
            "stage4_artifacts": installs(in_layer, f"{OUT_IN_IMAGE}/"),
            "stage4_artifacts_in_layer": True,
            "stage4_mltk": mltk or {"modules": []},
            "stage4_initramfs": {
                "tarball": str(initramfs_tar),
                "has_script": has_script,
                "modules": list(ctx.image.initramfs.dracut_modules),
                "script_args": list(ctx.image.initramfs.script_args),
            },
        }
        plays = ansible.site(
            [ansible.play("stage4 dev: packages", ["stage4_packages"])],
            list(layer.playbooks),
            [
                ansible.play(
                    "stage4 dev: components",
                    ["stage4_components", "stage4_install_artifacts"],
                    gather_facts=False,
                ),
                *(
                    [ansible.play("stage4 dev: mltk modules", ["stage4_mltk_build"], gather_facts=False)]
                    if mltk
                    else []
                ),
                ansible.play("stage4 dev: initramfs", ["stage4_initramfs"], gather_facts=False),
            ],
        )
        with timed(timings, "provision"):
            provision_layer(ctx, base_manifest, "dev", layer, overlay_path, plays, variables, work)
        step = f"{ctx.name}: dev: extract kernel, initramfs and artifacts"
        staging = work / ARTIFACTS_DIR
        with (
            display.step(step),
            timed(timings, "extract"),
            attach.attached(
                overlay_path,
                base_root_partition(ctx, base_manifest),
                work / "attach",
                runner,
                writable=False,
                step=step,
            ) as root,
        ):
            artifacts = extract.extract(root, ctx.image, kernel, staging, runner, step)
            if mltk:
                out = root / OUT_IN_IMAGE.lstrip("/")
                artifacts["mltk"] = mltk_plan.extract(out, staging, mltk, step, runner.log_path)
                artifacts["files"] = sorted([*artifacts["files"], *artifacts["mltk"]["files"]])
            packages = packages_of(root, runner)
        ctx.image_dir.mkdir(parents=True, exist_ok=True)
        _replace_dir(staging, ctx.image_dir / ARTIFACTS_DIR)
        kept = ctx.image_dir / DEV_IMAGE
        if ctx.keep_dev:
            with temporary_sibling(kept) as partial:
                shutil.copyfile(overlay_path, partial)
                place_atomically(partial, kept)
        else:
            kept.unlink(missing_ok=True)
    finally:
        remove_tree(work)
    return {
        "way": layer.way.value,
        "kernel_version": kernel,
        "playbooks": [str(p) for p in layer.playbooks],
        "packages_requested": list(layer.packages),
        "components": sorted(ctx.image.components),
        "dracut_modules": list(ctx.image.initramfs.dracut_modules),
        "initramfs_source": ctx.image.initramfs.effective_source.describe(),
        "artifacts": artifacts,
        "packages": packages,
        "kept": str(kept) if ctx.keep_dev else None,
        "files": file_facts(ctx.image_dir, *(f"{ARTIFACTS_DIR}/{name}" for name in artifacts["files"])),
        "timings_seconds": timings,
    }


def packages_of(root: Path, runner: Runner) -> dict[str, str]:
    return installed_packages(root, runner) if (root / "var/lib/dpkg/status").is_file() else {}


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished directory into place; the old one is renamed away first, then removed."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    remove_tree(partial)
    shutil.copytree(staging, partial)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    remove_tree(old)
