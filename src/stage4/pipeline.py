"""The pipeline of one image: base → dev → prod. Read this module first.

Each step declares the manifest it writes beside its files in the image's output folder, its identity
(a hash of its parent's identity and of all of its own inputs, see identity.py) and how it runs:

    base  a generic OS installation (builders/base_image.py)             base.json, base.qcow2
    dev   throw-away overlay: components, initramfs; results extracted   dev.json, artifacts/
    prod  fresh overlay with the artifacts, flattened (layers/prod.py)   prod.json, prod.qcow2

`stage4 export` then publishes the last step's image with the facts its manifest carries.

One reuse decision serves every step, for `stage4 build` and `stage4 layers` alike (`Step.current`):
the stored manifest has the wanted identity and every file it lists is there with its size and sha256.
`build_image` walks the steps in order: a current step is reused; a step that runs makes every later
step run. One writer (`write_manifest`) adds what all manifests share. Facts travel forward in the
manifests (kernel version, root partition and identifier, artifacts); later steps and export read them
there instead of guessing them back out of an image.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage4 import __version__, workdirs
from stage4 import manifest as manifests
from stage4.builders import base_image
from stage4.config import ImageConfig
from stage4.context import Context
from stage4.fsutil import sha256_file
from stage4.layers import dev, prod


@dataclass
class StepResult:
    step: str
    manifest: dict[str, Any]
    reused: bool
    image_dir: Path

    @property
    def identity(self) -> str:
        identity: str = self.manifest["identity"]
        return identity

    @property
    def image(self) -> Path | None:
        return self.image_dir / self.manifest["image"]["file"] if "image" in self.manifest else None


@dataclass
class ImageResult:
    """The steps of one image as they were reused or built; the last one is the image to use."""

    name: str
    steps: dict[str, StepResult] = field(default_factory=dict)

    @property
    def last(self) -> StepResult:
        return list(self.steps.values())[-1]

    @property
    def image(self) -> Path:
        # The last step of every image (base or prod) has an image file; its manifest names it.
        image = self.last.image
        if image is None:
            raise ValueError(f"{self.name}: the manifest of step {self.last.step} names no image")
        return image

    @property
    def manifest(self) -> dict[str, Any]:
        return self.last.manifest

    @property
    def identity(self) -> str:
        return self.last.identity

    @property
    def reused(self) -> bool:
        return all(step.reused for step in self.steps.values())

    @property
    def built(self) -> list[str]:
        return [step.step for step in self.steps.values() if not step.reused]

    @property
    def base(self) -> StepResult:
        return self.steps["base"]

    @property
    def dev_manifest(self) -> dict[str, Any]:
        return self.steps["dev"].manifest if "dev" in self.steps else {}

    @property
    def artifacts_dir(self) -> Path:
        return self.image.parent / dev.ARTIFACTS_DIR


class ParentMissing(Exception):
    """A step's identity needs facts of its parent's manifest, which is not there yet."""


class Step:
    name: str

    @property
    def manifest_file(self) -> str:
        return manifests.file_name(self.name)

    def identity(self, ctx: Context, done: dict[str, StepResult]) -> str:
        raise NotImplementedError

    def run(self, ctx: Context, identity: str, done: dict[str, StepResult]) -> dict[str, Any]:
        """Build the step's files into the image folder; returns the step's part of its manifest."""
        raise NotImplementedError

    def current(self, ctx: Context, identity: str) -> dict[str, Any] | None:
        """The stored manifest if it has this identity and every file it lists is intact."""
        manifest = manifests.read(ctx.image_dir / self.manifest_file)
        if not manifest or manifest.get("identity") != identity:
            return None
        for relative, facts in manifest.get("files", {}).items():
            path = ctx.image_dir / relative
            if (
                not path.is_file()
                or path.stat().st_size != facts["size"]
                or sha256_file(path) != facts["sha256"]
            ):
                return None
        return manifest


class BaseStep(Step):
    name = "base"

    def identity(self, ctx: Context, done: dict[str, StepResult]) -> str:
        return base_image.identity(ctx)

    def run(self, ctx: Context, identity: str, done: dict[str, StepResult]) -> dict[str, Any]:
        return base_image.build(ctx, identity)


class DevStep(Step):
    name = "dev"

    def identity(self, ctx: Context, done: dict[str, StepResult]) -> str:
        return dev.identity(ctx.image, _parent(done, "base"))

    def run(self, ctx: Context, identity: str, done: dict[str, StepResult]) -> dict[str, Any]:
        return dev.build(ctx, identity, done["base"].manifest)

    def current(self, ctx: Context, identity: str) -> dict[str, Any] | None:
        if ctx.keep_dev and not (ctx.image_dir / dev.DEV_IMAGE).is_file():
            return None  # asked to keep the dev layer, which was thrown away: build it again
        return super().current(ctx, identity)


class ProdStep(Step):
    name = "prod"

    def identity(self, ctx: Context, done: dict[str, StepResult]) -> str:
        return prod.identity(ctx.image, _parent(done, "base"), _parent(done, "dev"))

    def run(self, ctx: Context, identity: str, done: dict[str, StepResult]) -> dict[str, Any]:
        return prod.build(ctx, identity, done["base"].manifest, done["dev"].manifest)


def steps_for(image: ImageConfig) -> list[Step]:
    """Every image has a base; one with a dev or prod table gets both layers on it."""
    return [BaseStep(), DevStep(), ProdStep()] if image.layered else [BaseStep()]


def build_image(ctx: Context) -> ImageResult:
    """Run the image's steps in order, reusing every step that is current."""
    # Two builds of one image would share work folders and output files: the second waits. What a killed
    # build left attached is released before anything is reused.
    with workdirs.image_build(ctx.cache_dir, ctx.name, ctx.output_dir, ctx.runner):
        result = ImageResult(ctx.name)
        run_from_here = False
        for step in steps_for(ctx.image):
            identity = step.identity(ctx, result.steps)
            run_from_here = run_from_here or step.name in ctx.rebuild
            stored = None if run_from_here else step.current(ctx, identity)
            if stored is not None:
                ctx.runner.display.info(f"{ctx.name}: {step.name} {identity[:16]} is up to date, reusing it")
                result.steps[step.name] = StepResult(step.name, stored, True, ctx.image_dir)
                continue
            parent = result.last.identity if result.steps else None
            manifest = write_manifest(ctx, step, identity, parent, step.run(ctx, identity, result.steps))
            result.steps[step.name] = StepResult(step.name, manifest, False, ctx.image_dir)
            run_from_here = True
        return result


@dataclass
class LayerStatus:
    name: str
    identity: str | None
    stored_identity: str | None
    file: Path | None
    size: int | None
    state: str  # what is cached: 'cached, up to date', 'stale (inputs changed)', 'not built', ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "identity": self.identity,
            "stored_identity": self.stored_identity,
            "file": str(self.file) if self.file else None,
            "size": self.size,
            "state": self.state,
        }


def status(ctx: Context) -> list[LayerStatus]:
    """Each step's wanted and stored identity, its files and what is cached: the reuse decision of build."""
    found: list[LayerStatus] = []
    done: dict[str, StepResult] = {}
    for step in steps_for(ctx.image):
        try:
            identity = step.identity(ctx, done)
        except ParentMissing as missing:
            found.append(LayerStatus(step.name, None, None, None, None, f"not built (needs the {missing})"))
            continue
        stored = manifests.read(ctx.image_dir / step.manifest_file) or {}
        files = [ctx.image_dir / relative for relative in stored.get("files", {})]
        size = sum(f.stat().st_size for f in files if f.is_file()) if files else None
        main = (
            ctx.image_dir / stored["image"]["file"]
            if "image" in stored
            else ctx.image_dir / dev.ARTIFACTS_DIR
            if files
            else None
        )
        if not stored.get("identity"):
            state = "not built"
        elif stored["identity"] != identity:
            state = "stale (inputs changed)"
        else:
            state = "cached, up to date" if step.current(ctx, identity) is not None else "damaged or missing"
        if step.name == "dev":
            state += (
                ", layer kept"
                if (ctx.image_dir / dev.DEV_IMAGE).is_file()
                else ", layer deleted (artifacts kept)"
            )
        found.append(LayerStatus(step.name, identity, stored.get("identity"), main, size, state))
        if stored:  # later identities build on the wanted one: a stale parent makes its children stale
            done[step.name] = StepResult(step.name, {**stored, "identity": identity}, True, ctx.image_dir)
    return found


def write_manifest(
    ctx: Context, step: Step, identity: str, parent: str | None, body: dict[str, Any]
) -> dict[str, Any]:
    """The one manifest writer: what every step's manifest shares, then the step's own facts."""
    manifest = {
        "kind": step.name,
        "name": ctx.name,
        "identity": identity,
        "parent": parent,
        "identifier": ctx.image.identifier,
        "filesystem": ctx.image.filesystem.value,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "stage4_version": __version__,
        **body,
    }
    manifests.write(ctx.image_dir / step.manifest_file, manifest)
    return manifest


def _parent(done: dict[str, StepResult], name: str) -> dict[str, Any]:
    if name not in done:
        raise ParentMissing(name)
    return done[name].manifest
