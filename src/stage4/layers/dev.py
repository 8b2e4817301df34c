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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage4.builders.bootstrap import installed_packages
from stage4.config import ImageConfig
from stage4.fsutil import file_facts, place_atomically, remove_tree, temporary_sibling
from stage4.layers import extract, identities
from stage4.layers.extract import OUT_IN_IMAGE
from stage4.layers.layer_run import LayerRun
from stage4.layers.layer_steps import kernel_of
from stage4.mltk import plan as mltk_plan
from stage4.provisioning import ansible, sources
from stage4.runner import Runner
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context

DEV_IMAGE, ARTIFACTS_DIR = "dev.qcow2", "artifacts"


def identity(image: ImageConfig, base_manifest: dict[str, Any]) -> str:
    return identities.dev_identity(image, base_manifest["identity"], kernel_of(base_manifest))


def build(ctx: Context, dev_id: str, base_manifest: dict[str, Any]) -> dict[str, Any]:
    """Build, extract and discard the dev layer; returns the dev part of its manifest."""
    return DevRun(ctx, base_manifest).run()


class DevRun(LayerRun):
    name, overlay_file = "dev", DEV_IMAGE

    def __init__(self, ctx: Context, base_manifest: dict[str, Any]) -> None:
        super().__init__(ctx, ctx.image.dev, base_manifest)
        self.kernel = kernel_of(base_manifest)
        self.components: list[dict[str, Any]] = []
        self.initramfs_tar = Path()
        self.initramfs_has_script = False
        self.mltk: mltk_plan.BuildPlan | None = None
        self.artifacts: dict[str, Any] = {}
        self.packages: dict[str, str] = {}

    def sub_steps(self) -> list[Callable[[], None]]:
        return [
            self.fetch_sources,
            self.create_overlay,
            self.provision,
            self.extract,
            self.keep_or_discard,
        ]

    def fetch_sources(self) -> None:
        """The components', the initramfs module's and the mltk modules' sources, before any layer."""
        ctx, step = self.ctx, self.step("fetch sources")
        into = self.work / "sources"
        with self.runner.display.step(step), timed(self.timings, "sources"):
            for name, component in sorted(ctx.image.components.items()):
                tarball = sources.fetch(
                    name, component.source, into, self.runner, f"{step} ({name})", ctx.cache_dir
                )
                self.components.append(
                    {
                        "name": name,
                        "tarball": str(tarball),
                        "build": list(component.build),
                        "artifacts": [a.model_dump(mode="json") for a in component.artifacts],
                        "build_packages": list(component.build_packages),
                    }
                )
            initramfs = ctx.image.initramfs.effective_source
            self.initramfs_tar = sources.fetch(
                "stage4-initramfs", initramfs, into, self.runner, f"{step} (initramfs)", ctx.cache_dir
            )
            self.initramfs_has_script = "build-initramfs.sh" in sources.top_level(self.initramfs_tar)
            # mltk modules are read and ordered here: a bad module name stops the build before the layer.
            self.mltk = mltk_plan.prepare(ctx, into, step) if ctx.image.mltk else None

    def provision(self) -> None:
        """Packages, the user's playbooks, the components, the mltk modules, then the initramfs."""
        image, layer = self.ctx.image, self.layer
        in_layer = [
            {"file": f"components/{name}/{artifact.path}", **artifact.model_dump(mode="json")}
            for name, component in sorted(image.components.items())
            for artifact in component.artifacts
        ]
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": self.kernel,
            "stage4_out": OUT_IN_IMAGE,
            "stage4_packages": list(layer.packages),
            "stage4_components": self.components,
            "stage4_artifacts": installs(in_layer, f"{OUT_IN_IMAGE}/", self.kernel),
            "stage4_mltk": self.mltk or {"modules": []},
            "stage4_initramfs": {
                "tarball": str(self.initramfs_tar),
                "has_script": self.initramfs_has_script,
                "modules": list(image.initramfs.dracut_modules),
                "script_args": list(image.initramfs.script_args),
            },
        }
        mltk_play = ansible.play("stage4 dev: mltk modules", ["stage4_mltk_build"])
        plays = ansible.site(
            [ansible.play("stage4 dev: packages", ["stage4_packages"])],
            list(layer.playbooks),
            [
                ansible.play(
                    "stage4 dev: components",
                    ["stage4_components", "stage4_install_artifacts"],
                ),
                *([mltk_play] if self.mltk else []),
                ansible.play("stage4 dev: initramfs", ["stage4_initramfs"]),
            ],
        )
        self.provision_with(plays, variables)

    def extract(self) -> None:
        """Kernel, initramfs, artifacts and the package list out of the layer, into artifacts/."""
        step = self.step("extract kernel, initramfs and artifacts")
        staging = self.work / ARTIFACTS_DIR
        with (
            self.runner.display.step(step),
            timed(self.timings, "extract"),
            self.attached_read_only(step) as root,
        ):
            artifacts = extract.extract(root, self.ctx.image, self.kernel, staging, self.runner, step)
            if self.mltk:
                out = root / OUT_IN_IMAGE.lstrip("/")
                artifacts["mltk"] = mltk_plan.extract(out, staging, self.mltk, step, self.runner.log_path)
                artifacts["files"] = sorted([*artifacts["files"], *artifacts["mltk"]["files"]])
            self.artifacts, self.packages = artifacts, packages_of(root, self.runner)
        self.ctx.image_dir.mkdir(parents=True, exist_ok=True)
        _replace_dir(staging, self.ctx.image_dir / ARTIFACTS_DIR)

    def keep_or_discard(self) -> None:
        """The layer itself is thrown away, or kept as dev.qcow2 with --keep-dev."""
        kept = self.ctx.image_dir / DEV_IMAGE
        if self.ctx.keep_dev:
            with temporary_sibling(kept) as partial:
                shutil.copyfile(self.overlay, partial)
                place_atomically(partial, kept)
        else:
            kept.unlink(missing_ok=True)

    def manifest(self) -> dict[str, Any]:
        ctx, layer = self.ctx, self.layer
        return {
            "way": layer.way.value,
            "kernel_version": self.kernel,
            "playbooks": [str(p) for p in layer.playbooks],
            "packages_requested": list(layer.packages),
            "components": sorted(ctx.image.components),
            "dracut_modules": list(ctx.image.initramfs.dracut_modules),
            "initramfs_source": ctx.image.initramfs.effective_source.describe(),
            "artifacts": self.artifacts,
            "packages": self.packages,
            "kept": str(ctx.image_dir / DEV_IMAGE) if ctx.keep_dev else None,
            "files": file_facts(
                ctx.image_dir, *(f"{ARTIFACTS_DIR}/{name}" for name in self.artifacts["files"])
            ),
            "timings_seconds": self.timings,
        }


def installs(artifacts: list[dict[str, Any]], prefix: str, kernel: str) -> list[dict[str, Any]]:
    """Where each artifact goes, with its mode; `prefix` locates the files (host or layer). Modules go
    into the kernel's extra/ folder."""
    extra = f"/lib/modules/{kernel}/extra"
    return [
        {
            "src": prefix + a["file"],
            "kind": a["kind"],
            "dest": a["dest"] if a["kind"] == "file" else f"{extra}/{Path(a['file']).name}",
            "mode": a["mode"] if a["kind"] == "file" else "0644",
        }
        for a in artifacts
    ]


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
