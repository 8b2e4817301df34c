"""The build context: everything the steps of one image build need, made by the API from the config.

It sits below the steps (builders/, layers/, mltk/, provisioning/) and the pipeline that runs them, so
that a step never imports the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stage4.config import ImageConfig, MachineConfig
from stage4.runner import Runner


@dataclass
class Context:
    """Everything the steps of one image build need; made by the API from the config."""

    name: str
    image: ImageConfig
    machine: MachineConfig
    source: str  # the config file, for error messages
    output_dir: Path
    cache_dir: Path
    runner: Runner
    rebuild: frozenset[str] = frozenset()
    keep_dev: bool = False

    @property
    def image_dir(self) -> Path:
        return self.output_dir / self.name
