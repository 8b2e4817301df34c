"""The Python API of stage4: what the CLI runs and what the tests call directly."""

from __future__ import annotations

import datetime as dt
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stage4 import diff as diff_mod
from stage4.boot import accel, qemu
from stage4.boot.qemu import BootResult, BootSpec
from stage4.builders.base_image import check_disk_fits
from stage4.config import DEFAULT_IDENTIFIER, Config, SourceConfig
from stage4.errors import InputError
from stage4.image.filesystem import extract_boot_files
from stage4.image.inspect import InspectReport, detect_identifier, inspect_image
from stage4.image.partitions import partitions, raw_view
from stage4.pipeline import LAYERS, Context, ImageResult, LayerStatus, build_image, read_manifest, status
from stage4.provisioning.source_cache import Entry, SourceCache
from stage4.runner import Runner
from stage4.ui import BuildLog, Display


@contextmanager
def _runner(log_path: Path | None, debug: bool) -> Iterator[Runner]:
    log = BuildLog(log_path) if log_path else None
    try:
        yield Runner(Display(debug=debug, log=log))
    except BaseException as exc:
        if log:
            log.write(f"stopped: {' '.join(str(exc).split()) or type(exc).__name__}")
        raise
    finally:
        if log:
            log.close()


def build(config: Config, images: list[str] | None = None, output_dir: Path | None = None,
          rebuild: set[str] | None = None, debug: bool = False, keep_dev: bool = False) -> list[ImageResult]:
    """Build the named images (default: all in the config); unchanged steps are reused.

    An image with [images.NAME.dev] or [images.NAME.prod] gets the dev and prod layers on its base and
    its result is the flattened prod image; `rebuild` forces the named steps and all after them.
    """
    names = images or list(config.images)
    for name in names:
        config.image(name)
    unknown = (rebuild or set()) - set(LAYERS)
    if unknown:
        raise InputError(f"--rebuild {sorted(unknown)[0]!r}: unknown layer; layers: {', '.join(LAYERS)}")
    check_disk_fits(config.machine, config.build.cache_dir, config.source)
    output_dir = (output_dir or config.build.output_dir).absolute()
    results = []
    for name in names:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = output_dir / name / "logs" / f"build-{stamp}.log"
        with _runner(log_path, debug) as runner:
            runner.display.info(f"{name}: build log {log_path}")
            results.append(build_image(_context(config, name, output_dir, runner, rebuild, keep_dev)))
    return results


def layers(config: Config, images: list[str] | None = None,
           output_dir: Path | None = None) -> dict[str, list[LayerStatus]]:
    """The steps of each image: wanted identity, stored identity, file, size and what is cached."""
    output_dir = (output_dir or config.build.output_dir).absolute()
    found: dict[str, list[LayerStatus]] = {}
    for name in images or list(config.images):
        config.image(name)
        with _runner(None, False) as runner:
            found[name] = status(_context(config, name, output_dir, runner))
    return found


def _context(config: Config, name: str, output_dir: Path, runner: Runner, rebuild: set[str] | None = None,
             keep_dev: bool = False) -> Context:
    return Context(name, config.images[name], config.machine, config.source, output_dir, config.build.cache_dir,
                   runner, frozenset(rebuild or ()), keep_dev)


def inspect(image: Path, identifier: str | None = None, debug: bool = False) -> InspectReport:
    """Facts about an image and the Stage4 requirement checks; does not change the image."""
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    with _runner(None, debug) as runner:
        return inspect_image(image, identifier, runner)


def diff(a: Path, b: Path, files: bool = False, debug: bool = False) -> dict:
    """What changed from A to B (manifests, built images or exported revisions); see stage4.diff."""
    with _runner(None, debug) as runner:
        return diff_mod.diff(a, b, files=files, runner=runner)


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
    try:
        serial_log.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(serial_log.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise InputError(f"{serial_log.parent}: cannot write the boot logs there ({exc.strerror}); "
                         "give --log FILE") from None
    manifest = _manifest_of(image)
    identifier = identifier or manifest.get("identifier")
    if kernel is None and manifest.get("kernel") and Path(manifest["kernel"]).is_file():
        kernel, initrd = Path(manifest["kernel"]), Path(manifest["initramfs"])  # the dev run's, as export has them
    with _runner(serial_log.with_suffix("").with_suffix(".stage4.log"), debug) as runner, \
            tempfile.TemporaryDirectory(prefix="stage4-boot-") as tmp:
        needs_kernel = via == "kernel" or config.machine.accelerator == "auto"  # the KVM probe boots it
        if identifier is None or (kernel is None and needs_kernel):
            with runner.display.step(f"read {image.name}"), raw_view(image, runner) as raw:
                identifier = identifier or detect_identifier(partitions(raw, runner)[1]) or DEFAULT_IDENTIFIER
                if kernel is None and needs_kernel:
                    kernel, initrd = extract_boot_files(raw, Path(tmp), runner, identifier)
        accelerator = accel.choose(config.machine.accelerator.value, kernel, runner, config.build.cache_dir)
        spec = BootSpec(image, accelerator, config.machine.cpus, config.machine.memory >> 20, serial_log,
                        writable=writable, timeout=timeout, firmware=firmware)
        if via == "kernel":
            spec.kernel, spec.initrd = kernel, initrd
            spec.append = f"root=PARTLABEL={identifier} ro console=ttyS0,115200n8 panic=-1"
        with runner.display.step(f"boot {image.name} via {via} ({firmware}) on {accelerator}, waiting for userspace"):
            return qemu.boot(spec, runner)


def _manifest_of(image: Path) -> dict:
    """The stage4 manifest of a built image (base.json beside base.qcow2, ...): where facts travel."""
    manifest = read_manifest(image.with_suffix(".json")) or {}
    return manifest if manifest.get("image", {}).get("file") == image.name else {}


def sources(config: Config) -> list[Entry]:
    """What stage4's source cache holds: git URLs at their refs, tarballs by sha256."""
    return SourceCache(config.build.cache_dir).entries()


def import_source(config: Config, url: str, location: Path, ref: str | None = None, sha256: str | None = None,
                  debug: bool = False) -> Entry:
    """Seed the source cache from a local copy, so that builds naming `url` work offline.

    A git URL takes `ref` (default: the config's default ref) from the clone `location`; a tarball URL
    (`sha256` given) takes the file `location` after checking its sha256.
    """
    if ref is not None and sha256 is not None:
        raise InputError("give --ref (a git URL) or --sha256 (a tarball), not both")
    cache = SourceCache(config.build.cache_dir)
    if sha256 is not None:
        return cache.import_tarball(url, sha256, location)
    with _runner(None, debug) as runner:
        return cache.import_git(url, ref or SourceConfig.model_fields["ref"].default, location, runner)


def remove_source(config: Config, url: str, ref: str | None = None, sha256: str | None = None,
                  debug: bool = False) -> Entry:
    """Forget a cached source: a git URL at `ref` (default: the config's default ref), or a tarball."""
    with _runner(None, debug) as runner:
        return SourceCache(config.build.cache_dir).remove(url, ref or SourceConfig.model_fields["ref"].default,
                                                          sha256, runner)
