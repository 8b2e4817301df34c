"""The Python API of stage4: what the CLI runs and what the tests call directly."""

from __future__ import annotations

import datetime as dt
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stage4.boot import accel, netboot as netboot_mod, qemu
from stage4.boot.qemu import BootResult, BootSpec
from stage4.builders.base import BaseJob, BaseResult, build_base, check_disk_fits
from stage4.config import Config, SourceConfig
from stage4.errors import InputError
from stage4.image.files import extract_boot_files, partitions, raw_view
from stage4.layers import chain
from stage4.layers.build import LayeredResult, LayerJob, build_layers, identities
from stage4.image.inspect import DEFAULT_IDENTIFIER, InspectReport, detect_identifier, inspect_image
from stage4.provisioning.source_cache import Entry, SourceCache
from stage4 import workdirs
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
          rebuild: set[str] | None = None, debug: bool = False,
          keep_dev: bool = False) -> list[BaseResult | LayeredResult]:
    """Build the named images (default: all in the config); unchanged layers are reused.

    An image with [images.NAME.dev] or [images.NAME.prod] gets the dev and prod layers on its base and
    its result is the flattened prod image; `rebuild` forces the named layers and all above them.
    """
    names = images or list(config.images)
    for name in names:
        config.image(name)
    unknown = (rebuild or set()) - set(chain.LAYERS)
    if unknown:
        raise InputError(f"--rebuild {sorted(unknown)[0]!r}: unknown layer; layers: {', '.join(chain.LAYERS)}")
    check_disk_fits(config.machine, config.build.cache_dir, config.source)
    output_dir = (output_dir or config.build.output_dir).absolute()
    results = []
    for name in names:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = output_dir / name / "logs" / f"build-{stamp}.log"
        with _runner(log_path, debug) as runner, \
                workdirs.image_build(config.build.cache_dir, name, output_dir, runner):
            runner.display.info(f"{name}: build log {log_path}")
            job = BaseJob(name, config.images[name], config.machine, config.source, output_dir,
                          config.build.cache_dir, runner, rebuild="base" in (rebuild or set()))
            base = build_base(job)
            if not config.images[name].layered:
                results.append(base)
                continue
            results.append(build_layers(LayerJob(
                name, config.images[name], config.machine, config.source, output_dir, config.build.cache_dir,
                runner, base, rebuild=set(rebuild or ()), keep_dev=keep_dev)))
    return results


def clean(config: Config, images: list[str] | None = None, cache: bool = False,
          debug: bool = False) -> workdirs.CleanReport:
    """Remove the work directories that no running build holds (releasing what a killed build left attached);
    with `cache` also the caches kept between builds (packages, initramfs images, probe kernel)."""
    with _runner(None, debug) as runner:
        return workdirs.clean(config.build.cache_dir, images, runner, shared_caches=cache)


def layers(config: Config, images: list[str] | None = None,
           output_dir: Path | None = None) -> dict[str, list[chain.LayerStatus]]:
    """The layer chain of each image: wanted identity, stored identity, file, size and what is cached."""
    from stage4.builders.base import BASE_IMAGE, BASE_MANIFEST

    output_dir = (output_dir or config.build.output_dir).absolute()
    found: dict[str, list[chain.LayerStatus]] = {}
    for name in images or list(config.images):
        image = config.image(name)
        image_dir = output_dir / name
        with _runner(None, False) as runner:
            job = BaseJob(name, image, config.machine, config.source, output_dir, config.build.cache_dir, runner)
            base_id = job.identity()
        stored = chain.read_json(image_dir / BASE_MANIFEST) or {}
        base_file = image_dir / BASE_IMAGE
        statuses = [_status("base", base_id, stored, base_file, base_file.is_file())]
        if image.layered and stored.get("kernel_versions"):
            base = BaseResult(name, base_file, stored, reused=True)
            base.manifest = {**stored, "identity": base_id}
            dev_id, prod_id = identities(image, base)
            dev_stored = chain.read_json(image_dir / chain.DEV_MANIFEST) or {}
            dev_file = image_dir / chain.DEV_IMAGE
            status = _status("dev", dev_id, dev_stored, dev_file if dev_file.is_file() else None,
                             chain.artifacts_intact(image_dir, dev_id) is not None)
            status.state += ", layer kept" if dev_file.is_file() else ", layer deleted (artifacts kept)"
            statuses.append(status)
            statuses.append(_status("artifacts", dev_id, chain.read_json(
                image_dir / chain.ARTIFACTS_DIR / chain.ARTIFACTS_MANIFEST) or {}, image_dir / chain.ARTIFACTS_DIR,
                chain.artifacts_intact(image_dir, dev_id) is not None, key="dev_identity"))
            prod_file = image_dir / chain.PROD_IMAGE
            statuses.append(_status("prod", prod_id, chain.read_json(image_dir / chain.PROD_MANIFEST) or {},
                                    prod_file, chain.prod_intact(image_dir, prod_id) is not None))
        elif image.layered:
            statuses += [chain.LayerStatus(layer, None, None, None, None, "not built (needs the base)")
                         for layer in ("dev", "prod")]
        found[name] = statuses
    return found


def _status(layer: str, wanted: str, stored: dict, path: Path | None, intact: bool,
            key: str = "identity") -> chain.LayerStatus:
    stored_id = stored.get(key)
    if path is not None and path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    else:
        size = path.stat().st_size if path is not None and path.is_file() else None
    if not stored_id:
        state = "not built"
    elif stored_id != wanted:
        state = "stale (inputs changed)"
    else:
        state = "cached, up to date" if intact else "damaged or missing"
    return chain.LayerStatus(layer, wanted, stored_id, path, size, state)


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
    try:
        serial_log.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(serial_log.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise InputError(f"{serial_log.parent}: cannot write the boot logs there ({exc.strerror}); "
                         "give --log FILE") from None
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


def _identifier(image: Path, runner: Runner) -> str:
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
    return detect_identifier(parts) or DEFAULT_IDENTIFIER


def netboot(config: Config, store: Path, name: str, rid: int | None = None, servers: tuple[str, ...] = (),
            timeout: float = 600, boot_dir: Path | None = None, serial_log: Path | None = None,
            debug: bool = False) -> netboot_mod.NetbootResult:
    """Boot revision `rid` (default: the newest) of `name` from `store` in qemu as a client does: boot
    files over HTTP, the image over DNBD3, both on 127.0.0.1 behind qemu's user network; exits only
    with the userspace marker and / checked to be the copy-on-write device over xloop over /dev/dnbd0.

    `servers` are DNBD3 servers on this machine (HOST:PORT, in the order the client tries them);
    none: a development server for `store` on a free loopback port.
    """
    revision = netboot_mod.find_revision(store, name, rid, boot_dir)
    targets = [netboot_mod.loopback_server(server) for server in servers]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    leaf = name.rsplit("/", 1)[-1]
    serial_log = serial_log or (config.build.output_dir.absolute() / "netboot"
                                / f"{leaf}.r{revision.rid}-{stamp}-{os.getpid()}.serial.log")
    with _runner(serial_log.with_suffix("").with_suffix(".stage4.log"), debug) as runner, \
            tempfile.TemporaryDirectory(prefix="stage4-netboot-") as tmp:
        return netboot_mod.netboot(revision, targets, config.machine, config.build.cache_dir, timeout,
                                   serial_log, Path(tmp), runner)
