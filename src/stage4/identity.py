"""Content-addressed identities: a layer's id is a hash of its parent's id and all of its inputs.

Like osbuild's stage ids: an unchanged layer has an unchanged id and is reused, a changed input
changes its id and the id of every layer above it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType


def identity(kind: str, inputs: Mapping[str, object], parent: str | None = None) -> str:
    canonical = json.dumps({"kind": kind, "parent": parent, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def source_digest(*modules: ModuleType) -> str:
    """Hash of the source text of the modules that implement a layer: changing the recipe changes the id."""
    digest = hashlib.sha256()
    for module in modules:
        if module.__file__ is None:
            raise ValueError(f"module {module.__name__} has no source file")
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()
