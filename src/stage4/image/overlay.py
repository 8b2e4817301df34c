"""qcow2 overlays on the base, and flattening a chain into one standalone image for export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stage4.errors import StepFailed
from stage4.runner import Runner


def create(base: Path, overlay: Path, runner: Runner, step: str) -> None:
    """A new, empty qcow2 whose backing file is `base` (absolute path, format always given)."""
    overlay.unlink(missing_ok=True)
    runner.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            "-F",
            "qcow2",
            "-b",
            base.absolute(),
            overlay,
        ],
        step=step,
    )


def info(image: Path, runner: Runner, step: str) -> dict[str, Any]:
    """`qemu-img info` of `image` (its JSON object)."""
    out = runner.run(["qemu-img", "info", "--output=json", "-U", image], step=step, capture=True).stdout
    facts: dict[str, Any] = json.loads(out)
    return facts


def flatten(overlay: Path, target: Path, runner: Runner, step: str) -> dict[str, Any]:
    """The whole chain of `overlay` as one standalone qcow2 v3, zstd-compressed; checked afterwards."""
    runner.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compat=1.1,compression_type=zstd",
            "-W",
            "-m",
            "8",
            overlay,
            target,
        ],
        step=step,
    )
    runner.run(["qemu-img", "check", "-q", "-f", "qcow2", target], step=f"{step} (check)")
    facts = info(target, runner, step)
    specific = facts.get("format-specific", {}).get("data", {})
    problems = []
    if facts.get("backing-filename"):
        problems.append(f"still has a backing file {facts['backing-filename']}")
    if specific.get("compat") != "1.1":
        problems.append(f"qcow2 compat {specific.get('compat')}, not 1.1 (v3)")
    if specific.get("compression-type") != "zstd":
        problems.append(f"compression {specific.get('compression-type')}, not zstd")
    if facts.get("dirty-flag") or specific.get("corrupt"):
        problems.append("dirty or corrupt")
    if problems:
        raise StepFailed(step, f"{target.name}: " + "; ".join(problems), runner.log_path)
    return facts
