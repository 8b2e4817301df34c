"""The layer chain of an image: base → dev (thrown away after extraction) → prod (flattened).

Each layer's identity is a hash of its parent's identity and all of its inputs (osbuild-style):
playbooks with the files beside them, variables, package lists, component and dracut-module sources,
stage4's own Ansible content and the code that builds the layer. The identities are written into the
manifests in the image's output directory; a layer whose identity is unchanged is reused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from stage4.config import ComponentConfig, ImageConfig, LayerConfig
from stage4.fsutil import sha256_file
from stage4.identity import identity, source_digest
from stage4.provisioning import sources
from stage4.provisioning.ansible import ANSIBLE_DIR

DEV_MANIFEST, DEV_IMAGE = "dev.json", "dev.qcow2"
PROD_MANIFEST, PROD_IMAGE = "prod.json", "prod.qcow2"
ARTIFACTS_DIR, ARTIFACTS_MANIFEST = "artifacts", "artifacts.json"
LAYERS = ("base", "dev", "prod")
# Files and folders Ansible finds beside a playbook: part of what the playbook means.
PLAYBOOK_NEIGHBOURS = ("roles", "files", "templates", "vars", "group_vars", "host_vars", "tasks",
                       "handlers", "library", "filter_plugins", "module_utils")


def _recipe() -> str:
    from stage4.layers import build, extract, overlay
    from stage4.provisioning import ansible, attach, packer_way, vm
    return source_digest(sys.modules[__name__], build, extract, overlay, ansible, attach, vm, packer_way, sources)


def playbook_inputs(playbook: Path) -> dict:
    """A playbook's content and the content of the Ansible folders beside it."""
    if not playbook.is_file():
        return {"path": str(playbook), "missing": True}
    found = {"path": playbook.name, "sha256": sha256_file(playbook)}
    for name in PLAYBOOK_NEIGHBOURS:
        folder = playbook.parent / name
        if folder.is_dir():
            found[name] = sources.tree_digest(folder)
    return found


def layer_inputs(layer: LayerConfig) -> dict:
    return {"playbooks": [playbook_inputs(p) for p in layer.playbooks], "packages": list(layer.packages),
            "vars": layer.vars}


def component_inputs(component: ComponentConfig) -> dict:
    data = component.model_dump(mode="json", exclude={"source"})
    return {**data, "source": sources.identity_inputs(component.source)}


def dev_identity(image: ImageConfig, base_identity: str, kernel: str) -> str:
    inputs = {
        "layer": layer_inputs(image.dev or LayerConfig()),
        "kernel_version": kernel,
        "initramfs": {"modules": list(image.initramfs.dracut_modules),
                      "script_args": list(image.initramfs.script_args),
                      "source": sources.identity_inputs(image.initramfs.effective_source)},
        "components": {name: component_inputs(c) for name, c in sorted(image.components.items())},
        "ansible_content": sources.tree_digest(ANSIBLE_DIR),
        "recipe": _recipe(),
    }
    return identity("dev", inputs, parent=base_identity)


def prod_identity(image: ImageConfig, base_identity: str, dev_id: str) -> str:
    inputs = {
        "layer": layer_inputs(image.prod or LayerConfig()),
        "artifacts_of_dev": dev_id,
        "runtime_packages": sorted({p for c in image.components.values() for p in c.runtime_packages}),
        "ansible_content": sources.tree_digest(ANSIBLE_DIR),
        "recipe": _recipe(),
    }
    return identity("prod", inputs, parent=base_identity)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def artifacts_intact(image_dir: Path, dev_id: str) -> dict | None:
    """The artifacts manifest if it belongs to this dev identity and every file is there unchanged."""
    manifest = read_json(image_dir / ARTIFACTS_DIR / ARTIFACTS_MANIFEST)
    if not manifest or manifest.get("dev_identity") != dev_id:
        return None
    for relative, facts in manifest["files"].items():
        path = image_dir / ARTIFACTS_DIR / relative
        if not path.is_file() or path.stat().st_size != facts["size"] or sha256_file(path) != facts["sha256"]:
            return None
    return manifest


def prod_intact(image_dir: Path, prod_id: str) -> dict | None:
    manifest = read_json(image_dir / PROD_MANIFEST)
    image = image_dir / PROD_IMAGE
    if not manifest or manifest.get("identity") != prod_id or not image.is_file():
        return None
    if image.stat().st_size != manifest["image"]["size"] or sha256_file(image) != manifest["image"]["sha256"]:
        return None
    return manifest


@dataclass
class LayerStatus:
    name: str
    identity: str | None
    stored_identity: str | None
    file: Path | None
    size: int | None
    state: str  # what is cached: 'up to date', 'stale', 'missing', ...

    def to_dict(self) -> dict:
        return {"name": self.name, "identity": self.identity, "stored_identity": self.stored_identity,
                "file": str(self.file) if self.file else None, "size": self.size, "state": self.state}
