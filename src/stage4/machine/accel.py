"""Which accelerator really runs guests here: KVM if a tiny guest boots on it, else TCG.

Opening /dev/kvm is not enough: on some hosts KVM_CREATE_VM succeeds but guests hang right after the
firmware hands over, or qemu aborts setting MSRs. So the probe boots a real kernel (no root file system)
under KVM and waits for it to get as far as looking for its root; the answer is cached per host boot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from stage4.machine.qemu_argv import headless_argv
from stage4.runner import Runner

PROBE_TIMEOUT = 30
# Printed once the kernel has initialised and looks for its root: it ran well past the firmware.
PROBE_PROGRESS = re.compile(r"VFS: Unable to mount root|Kernel panic|Run /init")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(kernel: Path, runner: Runner) -> tuple[bool, str]:
    """Boot `kernel` under KVM; (True, '') if it gets to mounting its root, else (False, why not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    argv: list[str | Path] = [
        *headless_argv("kvm", 1, 256),
        "-kernel",
        kernel,
        "-append",
        "console=ttyS0 panic=-1",
    ]
    with runner.background(argv, step="probe KVM", grace=2) as process:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while time.monotonic() < deadline:
            if any(PROBE_PROGRESS.search(line) for line in list(process.lines)):
                return True, ""
            if not process.running():
                tail = " | ".join(list(process.lines)[-3:])
                return False, f"qemu exited with {process.popen.returncode}: {tail}"
            time.sleep(0.2)
    return False, f"a kernel under KVM printed nothing useful within {PROBE_TIMEOUT} s"


def keep_probe_kernel(kernel: Path, cache_dir: Path) -> None:
    """Keep a kernel for later probes, e.g. before a Packer build, where no image kernel is at hand yet."""
    target = cache_dir / "probe" / "vmlinuz"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, target)


def choose(requested: str, kernel: Path | None, runner: Runner, cache_dir: Path) -> str:
    """'kvm' or 'tcg' for `requested` ('auto', 'kvm' or 'tcg')."""
    if requested != "auto":
        return requested
    cache = cache_dir / "accelerator.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == _boot_id():
            known: str = cached["accelerator"]  # as written below
            return known
    except (OSError, ValueError, KeyError):
        pass
    kept = cache_dir / "probe" / "vmlinuz"
    kernel = kernel or (kept if kept.exists() else None)
    if kernel is None:
        runner.display.info(
            "accelerator: tcg (KVM not probed: no kernel at hand yet; build a bootstrap image once)"
        )
        return "tcg"
    with runner.display.step("probe accelerator (KVM, else TCG)"):
        works, why = probe_kvm(kernel, runner)
    accelerator = "kvm" if works else "tcg"
    runner.display.info(f"accelerator: {accelerator}" + ("" if works else f" (KVM unusable: {why})"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boot_id": _boot_id(), "accelerator": accelerator, "reason": why}))
    return accelerator
