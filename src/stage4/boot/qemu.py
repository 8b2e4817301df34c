"""Booting an image in qemu like a Stage4 client: read-only, and proving that userspace came up.

The proof is a marker: stage4 passes a random nonce through qemu's fw_cfg; the image's
stage4-marker.service prints it on the serial console once multi-user.target is reached and, when
asked through fw_cfg as well, powers the guest off. A nonce from this very boot cannot be an old line.
A desktop image's marker waits for its display manager and reports it first: the boot fails unless it is
active, and a screenshot boot then dumps the screen through QMP (screen.py) instead of a poweroff.
"""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stage4.boot import screen
from stage4.errors import InputError, StepFailed
from stage4.machine import ssh_host_keys
from stage4.machine.qemu_argv import headless_argv
from stage4.runner import Runner

POWEROFF_WAIT = 90
# Terminal escape sequences (GRUB's menu draws with CSI sequences) and other control characters.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-~]|[\x00-\x1f\x7f]"
)
OVMF = Path("/usr/share/ovmf/OVMF.fd")
# Printed by a desktop image's marker (the stage4_desktop role) before the marker line itself.
DISPLAY_MANAGER = re.compile(r"STAGE4-DISPLAY-MANAGER (?P<unit>\S+) (?P<state>\S+)")
# The marker's report on the units mltk modules enabled (NAME=ActiveState/Result ...), see mltk-units.sh.
MODULE_UNITS = re.compile(r"STAGE4-MLTK-UNITS(?P<units>( \S+=\S+)*)\s*$")
# The guest gave up and waits at a console nobody types into: dracut's emergency shell or systemd's
# emergency.target. Such a boot used to wait out the whole timeout (600 s by default). systemd's own line
# comes first and is the only one when the shell itself cannot start (an initramfs without
# /lib/dracut-lib.sh: emergency.service fails and is restarted, the guest never gets further).
EMERGENCY = re.compile(r"Entering emergency mode|You are in emergency mode|Reached target emergency\.target")
FAILED_UNIT = re.compile(r"Failed to start (?P<unit>\S+)")
# x86's COMMAND_LINE_SIZE less its NUL: the kernel cuts a longer command line off without a word.
COMMAND_LINE_MAX = 2047


def with_kernel_args(append: str, extra: tuple[str, ...]) -> str:
    """The command line `append` with the user's --kernel-arg words last, where they override earlier
    ones (dracut and systemd read the last of a repeated argument)."""
    for arg in extra:
        if not arg or any(not 33 <= ord(char) <= 126 for char in arg):
            raise InputError(
                f"--kernel-arg {arg!r}: expected one kernel argument, printable ASCII without spaces"
            )
    line = " ".join([append, *extra]).strip()
    if len(line) > COMMAND_LINE_MAX:
        raise InputError(
            f"--kernel-arg: the kernel command line would be {len(line)} bytes, more than the kernel's "
            f"{COMMAND_LINE_MAX}"
        )
    return line


def whole_names(units: list[str]) -> list[str]:
    """UNITS without the names systemd's status line shortened ("systemd-jo…ald.service", "systemd-ud…nager"
    from "systemd-udevd.service - Rule-based Manager") where its kernel-log copy gave the whole name."""
    whole = [unit for unit in units if "…" not in unit]
    return [
        unit
        for unit in units
        if "…" not in unit or not any(name.startswith(unit.partition("…")[0]) for name in whole)
    ]


@dataclass
class BootSpec:
    image: Path | None  # None: no disk (a network boot)
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
    # The -nic option (a network boot adds its forwards). restrict=on: the guest reaches nothing but the
    # forwards (no NAT to the host's networks: a booted image's DNS, NTP or apt stays inside qemu).
    nic: str = "user,model=virtio-net-pci,restrict=on"
    other_nics: tuple[
        str, ...
    ] = ()  # -nic options of NICs before that one (a network boot: one without DHCP)
    # a console line that ends the boot as failed (e.g. the initramfs's)
    fail_on: re.Pattern[str] | None = None
    on_marker: Callable[[], None] | None = None  # called the moment the marker is seen
    screenshot: Path | None = None  # a PNG of the display manager's screen, taken instead of the poweroff
    disk: Path | None = None  # a raw disk the guest may write to (a netboot client's local disk)


@dataclass
class BootResult:
    seconds: float
    accelerator: str
    serial_log: Path
    marker: str
    powered_off: bool
    display_manager: str | None = None  # the active display manager's unit, on desktop images
    screenshot_colours: int | None = None
    module_units: dict[str, str] = field(default_factory=dict)  # mltk images: unit -> ActiveState/Result
    ssh_host_key: str = ""  # the fingerprint of the ed25519 host key offered to the guest (ssh_host_keys)


def _format(image: Path) -> str:
    with image.open("rb") as handle:
        return "qcow2" if handle.read(4) == b"QFI\xfb" else "raw"


def build_argv(spec: BootSpec, nonce: str, qmp_socket: Path | None = None) -> list[str]:
    argv = headless_argv(spec.accelerator, spec.cpus, spec.memory_mib)
    if spec.image is not None:
        snapshot = "off" if spec.writable else "on"
        argv += ["-drive", f"file={spec.image},if=virtio,format={_format(spec.image)},snapshot={snapshot}"]
    for nic in spec.other_nics:
        argv += ["-nic", nic]
    if spec.disk is not None:
        argv += ["-drive", f"file={str(spec.disk).replace(',', ',,')},if=virtio,format=raw,snapshot=off"]
    argv += [
        "-nic",
        spec.nic,
        "-fw_cfg",
        f"name=opt/org.stage4/marker,string={nonce}",
    ]
    if spec.screenshot is None:
        argv += ["-fw_cfg", "name=opt/org.stage4/poweroff,string=1"]
    else:
        width, height = screen.SCREEN_SIZE
        argv += [
            "-qmp",
            f"unix:{qmp_socket},server=on,wait=off",
            "-vga",
            "none",
            "-device",
            f"VGA,edid=on,xres={width},yres={height}",
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
    failed: list[str] = []
    failed_units: list[str] = []

    def on_line(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if failed:
            return
        if spec.fail_on is not None and spec.fail_on.search(line):
            failed.append(line.strip())
            return
        plain = ESCAPES.sub("", line)
        if (unit := FAILED_UNIT.search(plain)) and unit["unit"] not in failed_units:
            failed_units.append(unit["unit"])
        if EMERGENCY.search(plain):
            after = f" after {', '.join(whole_names(failed_units))} failed" if failed_units else ""
            failed.append(f"the guest entered an emergency shell{after}")

    with (
        tempfile.TemporaryDirectory(prefix="stage4-qmp-") as tmp,
        spec.serial_log.open("w", encoding="utf-8", errors="replace") as log,
        runner.background(
            [
                *build_argv(spec, nonce, Path(tmp) / "qmp.sock"),
                *ssh_host_keys.fw_cfg_argv(Path(tmp), runner, step="boot"),
            ],
            step="boot",
            grace=5,
            on_line=on_line,
        ) as process,
    ):
        seen_at = None
        while time.monotonic() - started < spec.timeout:
            if any(marker.search(line) for line in list(process.lines)):
                seen_at = time.monotonic() - started
                if spec.on_marker is not None:
                    spec.on_marker()
                break
            if failed or not process.running():
                break
            time.sleep(0.5)
        if failed:
            raise StepFailed("boot", failed[0], spec.serial_log)
        if seen_at is None:
            shown = (ESCAPES.sub("", line).strip() for line in list(process.lines)[-8:])
            tail = " | ".join(line for line in shown if line)
            why = (
                f"qemu exited with {process.popen.returncode}"
                if not process.running()
                else f"no userspace marker within {spec.timeout:.0f} s"
            )
            raise StepFailed("boot", f"{why}; last console lines: {tail[-800:]}", spec.serial_log)
        lines = list(process.lines)  # what the guest printed up to its marker: both reports are before it
        display_manager = check_display_manager(lines, spec)
        module_units = check_module_units(lines, spec)
        colours = None
        if spec.screenshot is not None:
            colours = screen.capture(Path(tmp) / "qmp.sock", spec.screenshot)
            screen.quit_guest(Path(tmp) / "qmp.sock")
        deadline = time.monotonic() + POWEROFF_WAIT
        while process.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        powered_off = not process.running()
        offered = ssh_host_keys.fingerprint(Path(tmp))
    return BootResult(
        seen_at,
        spec.accelerator,
        spec.serial_log,
        nonce,
        powered_off,
        display_manager,
        colours,
        module_units,
        offered,
    )


def check_module_units(lines: list[str], spec: BootSpec) -> dict[str, str]:
    """The units of an mltk image's modules as its marker reported them (in one or more lines; a unit's
    last report counts); a boot fails when one failed (ActiveState failed, or a Result other than
    success; a target has none), naming each such unit."""
    states = dict(
        word.split("=", 1)
        for match in map(MODULE_UNITS.search, lines)
        if match
        for word in match["units"].split()
    )
    broken = [
        f"{unit} is {state}"
        for unit, state in states.items()
        # A target has no Result: its ActiveState tells.
        if state.startswith("failed/") or not state.endswith(("/success", "/"))
    ]
    if broken:
        raise StepFailed(
            "boot", f"the mltk modules' units did not all start: {', '.join(broken)}", spec.serial_log
        )
    return states


def check_display_manager(lines: list[str], spec: BootSpec) -> str | None:
    """The display manager a desktop image reported active before its marker; a boot fails without it."""
    found = next((m for m in map(DISPLAY_MANAGER.search, lines) if m), None)
    if found is None:
        if spec.screenshot is not None:
            raise StepFailed(
                "boot",
                "no display manager reported: a screenshot needs a desktop image ([images.NAME.desktop])",
                spec.serial_log,
            )
        return None
    if found["state"] != "active":
        raise StepFailed(
            "boot", f"the display manager did not start: {found['unit']} is {found['state']}", spec.serial_log
        )
    return found["unit"]
