"""`stage4 mltk plan`: for each image's mltk modules, before any layer, whether each can run here."""

from __future__ import annotations

import tempfile
from pathlib import Path

from stage4.config import Config
from stage4.errors import InputError
from stage4.mltk import plan
from stage4.mltk.readiness import Readiness
from stage4.runner import Runner
from stage4.ui import Display


def mltk_plan(config: Config, images: list[str] | None = None, debug: bool = False) -> list[Readiness]:
    """The modules of each named image (default: every image with [images.NAME.mltk]), targets expanded,
    in order, with their packages, downloads and whether they can run on this host (readiness.py); the
    build refuses the same modules with the same lines before its dev layer."""
    names = images or [name for name, image in config.images.items() if image.mltk]
    if not names:
        raise InputError(f"{config.source}: no image has an [images.NAME.mltk] table")
    runner = Runner(Display(debug=debug))
    found = []
    for name in names:
        image = config.image(name)
        if image.mltk is None:
            raise InputError(f"{config.source}: image {name!r} has no [images.{name}.mltk] table")
        distro = image.mltk.distro or image.distribution
        step = f"mltk plan {name}"
        with tempfile.TemporaryDirectory(prefix="stage4-mltk-plan-") as tmp:
            _tarball, tree = plan.checkout(name, image.mltk, Path(tmp), runner, step, config.build.cache_dir)
            order, _versions, _variables = plan.read_modules(
                config.source, name, image.mltk, distro, tree, runner, step
            )
            found.append(plan.check(name, order, image.distribution, tree, config.build.cache_dir, runner))
    return found
