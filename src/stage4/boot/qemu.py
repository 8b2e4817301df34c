"""Booting an image in qemu like a Stage4 client: read-only, and proving that userspace came up.

The proof is a marker: stage4 passes a random nonce through qemu's fw_cfg; the image's
stage4-marker.service prints it on the serial console once multi-user.target is reached and, when
asked through fw_cfg as well, powers the guest off. A nonce from this very boot cannot be an old line.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from stage4.boot.accel import cpu_model
from stage4.errors import StepFailed
from stage4.runner import Runner

POWEROFF_WAIT = 90
# Terminal escape sequences (GRUB's menu draws with CSI sequences) and other control characters.
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]|[\x00-\x1f\x7f]")
OVMF = Path("/usr/share/ovmf/OVMF.fd")


@dataclass
class BootSpec:
    image: Path
    accelerator: str
    cpus: int
    memory_mib: int
    serial_log: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    writable: bool = False
    timeout: float = 600
    firmware: str = "bios"


@dataclass
class BootResult:
    seconds: float
    accelerator: str
    serial_log: Path
    marker: str
    powered_off: bool


def _format(image: Path) -> str:
    with image.open("rb") as handle:
        return "qcow2" if handle.read(4) == b"QFI\xfb" else "raw"


def build_argv(spec: BootSpec, nonce: str) -> list[str]:
    drive = f"file={spec.image},if=virtio,format={_format(spec.image)},snapshot={'off' if spec.writable else 'on'}"
    argv = [
        "qemu-system-x86_64", "-accel", spec.accelerator, "-cpu", cpu_model(spec.accelerator),
        "-smp", str(spec.cpus), "-m", str(spec.memory_mib),
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
        "-drive", drive, "-nic", "user,model=virtio-net-pci",
        "-fw_cfg", f"name=opt/org.stage4/marker,string={nonce}",
        "-fw_cfg", "name=opt/org.stage4/poweroff,string=1",
    ]
    if spec.firmware == "uefi":
        argv += ["-bios", str(OVMF)]
    if spec.kernel:
        argv += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd:
            argv += ["-initrd", str(spec.initrd)]
    return argv


def boot(spec: BootSpec, runner: Runner) -> BootResult:
    nonce = secrets.token_hex(8)
    marker = re.compile(rf"STAGE4-USERSPACE-UP {nonce}")
    spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with spec.serial_log.open("w", encoding="utf-8", errors="replace") as log, \
            runner.background(build_argv(spec, nonce), step="boot", grace=5,
                              on_line=lambda line: (log.write(line + "\n"), log.flush())) as process:
        seen_at = None
        while time.monotonic() - started < spec.timeout:
            if any(marker.search(line) for line in list(process.lines)):
                seen_at = time.monotonic() - started
                break
            if not process.running():
                break
            time.sleep(0.5)
        if seen_at is None:
            shown = (ESCAPES.sub("", line).strip() for line in list(process.lines)[-8:])
            tail = " | ".join(line for line in shown if line)
            why = (f"qemu exited with {process.popen.returncode}" if not process.running()
                   else f"no userspace marker within {spec.timeout:.0f} s")
            raise StepFailed("boot", f"{why}; last console lines: {tail[-800:]}", spec.serial_log)
        deadline = time.monotonic() + POWEROFF_WAIT
        while process.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        powered_off = not process.running()
    return BootResult(seen_at, spec.accelerator, spec.serial_log, nonce, powered_off)
