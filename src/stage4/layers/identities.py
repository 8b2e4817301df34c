"""What the dev and prod layers' identities are made of (osbuild-style: parent identity + all inputs).

Inputs: playbooks with the Ansible folders beside them, variables, package lists, component and
dracut-module sources, stage4's own Ansible content, and the code that builds the layers (the recipe:
the layers and provisioning packages). The pipeline compares them with the identities in the manifests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stage4 import mltk
from stage4.config import ComponentConfig, ImageConfig, LayerConfig
from stage4.fsutil import sha256_file
from stage4.identity import identity
from stage4.provisioning import sources
from stage4.provisioning.ansible import ANSIBLE_DIR

# Files and folders Ansible finds beside a playbook: part of what the playbook means.
PLAYBOOK_NEIGHBOURS = (
    "roles",
    "files",
    "templates",
    "vars",
    "group_vars",
    "host_vars",
    "tasks",
    "handlers",
    "library",
    "filter_plugins",
    "module_utils",
)


def playbook_inputs(playbook: Path) -> dict[str, Any]:
    """A playbook's content and the content of the Ansible folders beside it."""
    if not playbook.is_file():
        return {"path": str(playbook), "missing": True}
    found = {"path": playbook.name, "sha256": sha256_file(playbook)}
    for name in PLAYBOOK_NEIGHBOURS:
        folder = playbook.parent / name
        if folder.is_dir():
            found[name] = sources.tree_digest(folder)
    return found


def layer_inputs(layer: LayerConfig) -> dict[str, Any]:
    return {
        "playbooks": [playbook_inputs(p) for p in layer.playbooks],
        "packages": list(layer.packages),
        "vars": layer.vars,
    }


def component_inputs(component: ComponentConfig) -> dict[str, Any]:
    data = component.model_dump(mode="json", exclude={"source"})
    return {**data, "source": sources.identity_inputs(component.source)}


def recipe() -> str:
    """The code that makes the dev and prod layers: changing it changes their identities."""
    return identity(
        "recipe",
        {
            "layers": sources.tree_digest(Path(__file__).parent),
            "provisioning": sources.tree_digest(ANSIBLE_DIR.parent),
            "mltk": sources.tree_digest(Path(mltk.__file__).parent),
        },
    )


def dev_identity(image: ImageConfig, base_identity: str, kernel: str) -> str:
    inputs = {
        "layer": layer_inputs(image.dev or LayerConfig()),
        "kernel_version": kernel,
        "initramfs": {
            "modules": list(image.initramfs.dracut_modules),
            "script_args": list(image.initramfs.script_args),
            "source": sources.identity_inputs(image.initramfs.effective_source),
        },
        "components": {name: component_inputs(c) for name, c in sorted(image.components.items())},
        "ansible_content": sources.tree_digest(ANSIBLE_DIR),
        "recipe": recipe(),
    }
    if image.mltk:
        # git: URL and ref (like components); a folder: its content.
        inputs["mltk"] = {
            **image.mltk.model_dump(mode="json", exclude={"source"}),
            "source": sources.identity_inputs(image.mltk.source),
        }
    return identity("dev", inputs, parent=base_identity)


def prod_identity(image: ImageConfig, base_identity: str, dev_id: str) -> str:
    inputs = {
        "layer": layer_inputs(image.prod or LayerConfig()),
        "artifacts_of_dev": dev_id,
        "runtime_packages": sorted({p for c in image.components.values() for p in c.runtime_packages}),
        "desktop": image.desktop.model_dump(mode="json") if image.desktop else None,
        "ansible_content": sources.tree_digest(ANSIBLE_DIR),
        "recipe": recipe(),
    }
    return identity("prod", inputs, parent=base_identity)
