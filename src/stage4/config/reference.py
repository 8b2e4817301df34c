"""`stage4 config --reference`: the Markdown table of every key, generated from the model's own
descriptions (so the documentation is the model that validates the file)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import (
    BaseModel,
)
from pydantic_core import PydanticUndefined

from stage4.config.components import (
    ArtifactConfig,
    ComponentConfig,
    InitramfsConfig,
    MltkConfig,
    SourceConfig,
)
from stage4.config.model import BuildPaths, DesktopConfig, ImageConfig, LayerConfig, MachineConfig


def reference() -> str:
    """Markdown reference of every config key, generated from the model."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    nested = {"dev", "prod", "desktop", "initramfs", "components", "source", "artifacts", "mltk"}

    def table(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            if field.exclude or name == "images" or name in nested and model is not ArtifactConfig:
                continue
            default = field.default
            shown = default.value if isinstance(default, StrEnum) else default
            if name in ("memory", "disk_size"):
                shown = f"{default >> 30}G"
            if name == "vars":
                shown = {}
            if shown is PydanticUndefined:
                shown = "(required)"
            lines.append(f"| `{prefix}.{name}` | `{shown!s}` | {field.description} |")

    table("machine", MachineConfig)
    table("build", BuildPaths)
    table("images.NAME", ImageConfig)
    table("images.NAME.dev", LayerConfig)
    table("images.NAME.prod", LayerConfig)
    table("images.NAME.desktop", DesktopConfig)
    table("images.NAME.initramfs", InitramfsConfig)
    lines.append(
        "| `images.NAME.initramfs.source` | the dnbd3-rootfs module shipped with stage4 | "
        f"{InitramfsConfig.model_fields['source'].description} |"
    )
    table("images.NAME.initramfs.source", SourceConfig)
    lines.append(
        "| `images.NAME.components` | dnbd3, xloop (public repositories) | components built in dev and "
        "installed in prod; a table replaces the defaults |"
    )
    table("images.NAME.components.C", ComponentConfig)
    table("images.NAME.components.C.source", SourceConfig)
    table("images.NAME.components.C.artifacts[]", ArtifactConfig)
    lines.append(
        "| `images.NAME.mltk.source` | `(required)` | "
        f"{MltkConfig.model_fields['source'].description}"
        "; giving [images.NAME.mltk] builds the dev and prod layers |"
    )
    table("images.NAME.mltk", MltkConfig)
    table("images.NAME.mltk.source", SourceConfig)
    return "\n".join(lines) + "\n"
