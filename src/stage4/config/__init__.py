"""The project file `stage4.toml`: one typed, validated model for the CLI, the builders and the docs.

Every field carries its description; `stage4 config --reference` renders them for the README, so the
documentation is generated from the same model that validates the file. fields.py holds the value types
and checks, components.py the sources, components, initramfs and mltk tables, model.py the rest of the
model, loading.py the reading of the file, reference.py the generated reference.
"""

from stage4.config.components import ComponentConfig, SourceConfig, default_components
from stage4.config.fields import (
    DEFAULT_IDENTIFIER,
    BuilderKind,
    Way,
    directory_problem,
    format_size,
    identifier_problem,
)
from stage4.config.loading import from_dict, load
from stage4.config.model import Config, ImageConfig, LayerConfig, MachineConfig
from stage4.config.reference import reference

__all__ = [
    "DEFAULT_IDENTIFIER",
    "BuilderKind",
    "ComponentConfig",
    "Config",
    "ImageConfig",
    "LayerConfig",
    "MachineConfig",
    "SourceConfig",
    "Way",
    "default_components",
    "directory_problem",
    "format_size",
    "from_dict",
    "identifier_problem",
    "load",
    "reference",
]
