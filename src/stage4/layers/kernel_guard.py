"""The kernel coupling guard of the prod layer (docs/client-boot.md, "Per-revision files").

The dev run built the initramfs and the extra modules for one kernel; the prod image must carry exactly
that kernel. The prod play holds the kernel packages first (role stage4_kernel_hold); after the run the
kernels installed in the layer are compared with the dev run's, and the hold found in the layer is what
prod.json records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stage4.errors import StepFailed
from stage4.runner import Runner

VERSIONLOCK_LIST = "etc/dnf/plugins/versionlock.list"


def installed_kernels(root: Path) -> list[str]:
    """Kernel versions with an image in /boot or a kernel's module tree in /lib/modules."""
    found = {path.name.removeprefix("vmlinuz-") for path in (root / "boot").glob("vmlinuz-*")}
    found |= {tree.name for tree in (root / "lib/modules").glob("*") if (tree / "kernel").is_dir()}
    return sorted(found)


def check(root: Path, kernel: str, step: str, runner: Runner, base_kernels: list[str] | None = None) -> None:
    """A StepFailed of one line naming both versions if the layer's kernels are not exactly the base's
    (`base_kernels`, default: only `kernel`, the one the dev run built for): none installed, upgraded or
    removed."""
    found, wanted = installed_kernels(root), sorted({kernel, *(base_kernels or ())})
    if found != wanted:
        base = f" (the base has {', '.join(wanted)})" if wanted != [kernel] else ""
        raise StepFailed(
            step,
            f"the prod layer changed the kernel: the dev run built the initramfs and modules "
            f"for {kernel}, prod has {', '.join(found) or 'no kernel'}{base}",
            runner.log_path,
        )


def hold(root: Path, runner: Runner) -> dict[str, Any]:
    """The kernel hold found in the layer: apt's held packages or dnf's version locks."""
    if (root / "var/lib/dpkg/status").is_file():
        result = runner.run(
            [
                "dpkg-query",
                f"--admindir={root / 'var/lib/dpkg'}",
                "-W",
                "-f=${Package}\\t${db:Status-Abbrev}\\n",
            ],
            step="held packages",
            capture=True,
        )
        held = sorted(
            name
            for name, status in (line.split("\t") for line in result.stdout.splitlines())
            if status.startswith("h")
        )
        return {"method": "apt-mark hold", "packages": held}
    locks = root / VERSIONLOCK_LIST
    lines = locks.read_text(encoding="utf-8").splitlines() if locks.is_file() else []
    return {
        "method": "dnf versionlock",
        "packages": sorted(line.strip() for line in lines if line.strip() and not line.startswith("#")),
    }
