"""The Python API of stage4: what the CLI runs and what the tests call directly."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stage4.boot import accel, qemu
from stage4.boot.qemu import BootResult, BootSpec
from stage4.builders.base import BaseJob, BaseResult, build_base
from stage4.config import Config
from stage4.errors import InputError
from stage4.image.files import extract_boot_files, partitions, raw_view
from stage4.image.inspect import DEFAULT_IDENTIFIER, InspectReport, detect_identifier, inspect_image
from stage4.runner import Runner
from stage4.ui import BuildLog, Display


@contextmanager
def _runner(log_path: Path | None, debug: bool) -> Iterator[Runner]:
    log = BuildLog(log_path) if log_path else None
    try:
        yield Runner(Display(debug=debug, log=log))
    finally:
        if log:
            log.close()


def build(config: Config, images: list[str] | None = None, output_dir: Path | None = None,
          rebuild: set[str] | None = None, debug: bool = False) -> list[BaseResult]:
    """Build the named images (default: all in the config); unchanged layers are reused."""
    names = images or list(config.images)
    for name in names:
        config.image(name)
    unknown = (rebuild or set()) - {"base"}
    if unknown:
        raise InputError(f"--rebuild {sorted(unknown)[0]!r}: unknown layer; layers: base")
    output_dir = (output_dir or config.build.output_dir).absolute()
    results = []
    for name in names:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = output_dir / name / "logs" / f"build-{stamp}.log"
        with _runner(log_path, debug) as runner:
            runner.display.info(f"{name}: build log {log_path}")
            job = BaseJob(name, config.images[name], config.machine, config.source, output_dir,
                          config.build.cache_dir, runner, rebuild="base" in (rebuild or set()))
            results.append(build_base(job))
    return results


def inspect(image: Path, identifier: str | None = None, debug: bool = False) -> InspectReport:
    """Facts about an image and the Stage4 requirement checks; does not change the image."""
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    with _runner(None, debug) as runner:
        return inspect_image(image, identifier, runner)


def boot(config: Config, image: Path, via: str = "bootloader", kernel: Path | None = None,
         initrd: Path | None = None, identifier: str | None = None, writable: bool = False,
         timeout: float = 600, serial_log: Path | None = None, firmware: str = "bios",
         debug: bool = False) -> BootResult:
    """Boot an image in qemu (read-only unless writable) and wait for its userspace marker."""
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    if via not in ("bootloader", "kernel"):
        raise InputError(f"--via {via!r}: expected 'bootloader' or 'kernel'")
    if firmware not in ("bios", "uefi"):
        raise InputError(f"--firmware {firmware!r}: expected 'bios' or 'uefi'")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    serial_log = serial_log or image.parent / "logs" / f"boot-{image.stem}-{via}-{firmware}-{stamp}.serial.log"
    with _runner(serial_log.with_suffix("").with_suffix(".stage4.log"), debug) as runner, \
            tempfile.TemporaryDirectory(prefix="stage4-boot-") as tmp:
        if kernel is None or via == "bootloader" and config.machine.accelerator == "auto":
            with runner.display.step(f"take kernel and initramfs out of {image.name}"):
                found_kernel, found_initrd = extract_boot_files(image, Path(tmp), runner, identifier or _identifier(image, runner))
            kernel, initrd = (kernel, initrd) if kernel else (found_kernel, found_initrd)
        accelerator = accel.choose(config.machine.accelerator.value, kernel, runner, config.build.cache_dir)
        root = identifier or _identifier(image, runner)
        spec = BootSpec(image, accelerator, config.machine.cpus, config.machine.memory >> 20, serial_log,
                        writable=writable, timeout=timeout, firmware=firmware)
        if via == "kernel":
            spec.kernel, spec.initrd = kernel, initrd
            spec.append = f"root=PARTLABEL={root} ro console=ttyS0,115200n8 panic=-1"
        with runner.display.step(f"boot {image.name} via {via} ({firmware}) on {accelerator}, waiting for userspace"):
            return qemu.boot(spec, runner)


def _identifier(image: Path, runner: Runner) -> str:
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
    return detect_identifier(parts) or DEFAULT_IDENTIFIER
