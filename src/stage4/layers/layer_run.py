"""The skeleton the dev and prod builds share: named sub-steps run in order in a fresh work folder.

A layer's build is a `LayerRun` (dev.DevRun, prod.ProdRun) whose `sub_steps` list reads like
pipeline.py's list of steps; each sub-step is a method that leaves its results on the run, and
`manifest` turns them into the layer's part of its manifest. The work folder goes away afterwards,
whatever happened (a rerun starts it afresh).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stage4 import distributions
from stage4.config import LayerConfig
from stage4.fsutil import remove_tree
from stage4.image import overlay
from stage4.layers.layer_steps import (
    base_root_partition,
    check_playbooks,
    fresh_work_dir,
    provision_layer,
)
from stage4.provisioning import ansible, attach
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context


class LayerRun:
    name: ClassVar[str]  # "dev" or "prod": the layer's table in the config and its manifest
    overlay_file: ClassVar[str]  # the overlay's name in the work folder

    def __init__(self, ctx: Context, layer: LayerConfig | None, base_manifest: dict[str, Any]) -> None:
        self.ctx, self.runner = ctx, ctx.runner
        self.layer = layer or LayerConfig()
        self.base_manifest = base_manifest
        self.work = Path()  # set by run(): fresh for every build
        self.timings: dict[str, float] = {}

    def sub_steps(self) -> list[Callable[[], None]]:
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        check_playbooks(self.ctx, self.name, self.layer)
        self.work = fresh_work_dir(self.ctx, self.name)
        try:
            for sub_step in self.sub_steps():
                sub_step()
        finally:
            remove_tree(self.work)
        return self.manifest()

    # What every layer's sub-steps use.
    def step(self, what: str) -> str:
        """The name of a sub-step as progress and errors show it."""
        return f"{self.ctx.name}: {self.name}: {what}"

    @property
    def overlay(self) -> Path:
        return self.work / self.overlay_file

    def create_overlay(self) -> None:
        base = self.ctx.image_dir / self.base_manifest["image"]["file"]
        overlay.create(base, self.overlay, self.runner, self.step("create overlay"))

    def provision_with(self, plays: list[dict[str, Any]], variables: dict[str, Any]) -> None:
        variables = {
            **variables,
            **ansible.distribution_facts(distributions.get(self.ctx.image.distribution)),
        }
        with timed(self.timings, "provision"):
            provision_layer(
                self.ctx, self.base_manifest, self.name, self.layer, self.overlay, plays, variables, self.work
            )

    def attached_read_only(self, step: str) -> AbstractContextManager[Path]:
        """The layer's root filesystem, mounted read-only on the host."""
        return attach.attached(
            self.overlay,
            base_root_partition(self.ctx, self.base_manifest),
            self.work / "attach",
            self.runner,
            writable=False,
            step=step,
        )
