"""The build manifest: the JSON file each step of an image writes beside its files, where facts travel.

`base.json`, `dev.json` and `prod.json` in an image's output folder; an image file's manifest is the one
beside it with the same stem (`prod.qcow2` -> `prod.json`) that names it as its `image.file`. The pipeline
writes them (one writer, `write`), and the pipeline, `stage4 diff`, export and the API read them here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stage4.fsutil import write_json_atomically

# The steps of an image, in order: each step's manifest is named after it.
LAYERS = ("base", "dev", "prod")


def file_name(layer: str) -> str:
    return f"{layer}.json"


def beside(image: Path) -> Path:
    """Where the manifest of an image file is (whether or not it exists)."""
    return Path(image).with_suffix(".json")


# A manifest is free-form JSON: each step adds its own facts.
Manifest = dict[str, Any]


def read(path: Path) -> Manifest | None:
    """The manifest at `path`, or None where there is none or it is not readable JSON."""
    try:
        manifest: Manifest | None = json.loads(Path(path).read_text(encoding="utf-8"))
        return manifest
    except (OSError, ValueError):
        return None


def of_image(image: Path) -> Manifest:
    """The manifest that describes `image` ({} where none beside it names the file)."""
    manifest = read(beside(image)) or {}
    return manifest if manifest.get("image", {}).get("file") == Path(image).name else {}


def write(path: Path, manifest: Mapping[str, object]) -> None:
    write_json_atomically(path, manifest)
