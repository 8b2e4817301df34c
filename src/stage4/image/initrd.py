"""What an initramfs holds, as lsinitrd lists it: the kernel versions of its modules and its dracut
modules. Read by the dev step's extraction (the initramfs must belong to the image's kernel) and by
`stage4 inspect`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TypedDict

from stage4.errors import StepFailed
from stage4.runner import Runner


class InitramfsFacts(TypedDict):
    kernel_versions: list[str]
    dracut_modules: list[str]


def initramfs_facts(initrd: Path, runner: Runner, step: str) -> InitramfsFacts:
    """Kernel versions of the modules in an initramfs and its dracut modules, as lsinitrd lists them."""
    if shutil.which("lsinitrd") is None:
        raise StepFailed(step, "lsinitrd not found on the host (install dracut-core: ./install.sh)")
    listing = runner.run(["lsinitrd", initrd], step=step, capture=True).stdout
    versions = sorted(set(re.findall(r"(?:usr/)?lib/modules/([^/\s]+)/", listing)))
    modules: list[str] = []
    if "dracut modules:" in listing:
        section = listing.split("dracut modules:", 1)[1]
        for line in section.splitlines()[1:]:
            if not line.strip() or line.startswith("="):
                break
            modules.append(line.strip())
    return {"kernel_versions": versions, "dracut_modules": modules}
