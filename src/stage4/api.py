"""The Python API of stage4: what the CLI runs and what the tests call directly."""

from __future__ import annotations

import datetime as dt
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from stage4 import diff as diff_mod
from stage4 import distributions as distributions_mod
from stage4 import manifest as manifests
from stage4 import workdirs
from stage4.boot import netboot as netboot_mod
from stage4.boot import qemu
from stage4.boot.local_disk import DiskRequest
from stage4.boot.qemu import BootResult, BootSpec
from stage4.builders import packer
from stage4.builders.base_image import check_disk_fits
from stage4.config import DEFAULT_IDENTIFIER, Config
from stage4.context import Context
from stage4.dnbd3 import client as dnbd3_client
from stage4.dnbd3 import protocol
from stage4.dnbd3 import verify as dnbd3_verify_mod
from stage4.dnbd3.server import DevServer
from stage4.dnbd3.store import Store, validate_name
from stage4.errors import InputError
from stage4.export import publish as export_publish
from stage4.export import records as export_records
from stage4.export import revisions as export_revisions
from stage4.export.publish import Publication
from stage4.image.filesystem import extract_boot_files
from stage4.image.inspect import InspectReport, detect_identifier, inspect_image
from stage4.image.partitions import partitions, raw_view
from stage4.machine import accel
from stage4.manifest import LAYERS
from stage4.mltk.report import mltk_plan as mltk_plan
from stage4.pipeline import ImageResult, LayerStatus, build_image, status
from stage4.provisioning.source_entries import import_source as import_source
from stage4.provisioning.source_entries import remove_source as remove_source
from stage4.provisioning.source_entries import sources as sources
from stage4.runner import Runner
from stage4.ui import BuildLog, Display

if TYPE_CHECKING:
    from stage4.api_options import RenderOptions, VerifyOptions


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


def build(
    config: Config,
    images: list[str] | None = None,
    output_dir: Path | None = None,
    rebuild: set[str] | None = None,
    debug: bool = False,
    keep_dev: bool = False,
) -> list[ImageResult]:
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


def clean(
    config: Config, images: list[str] | None = None, cache: bool = False, debug: bool = False
) -> workdirs.CleanReport:
    """Remove the work directories that no running build holds (releasing what a killed build left attached);
    with `cache` also the caches kept between builds (packages, initramfs images, probe kernel, trees)."""
    with _runner(None, debug) as runner:
        return workdirs.clean(config.build.cache_dir, images, runner, shared_caches=cache)


def layers(
    config: Config, images: list[str] | None = None, output_dir: Path | None = None
) -> dict[str, list[LayerStatus]]:
    """The steps of each image: wanted identity, stored identity, file, size and what is cached."""
    output_dir = (output_dir or config.build.output_dir).absolute()
    found: dict[str, list[LayerStatus]] = {}
    for name in images or list(config.images):
        config.image(name)
        with _runner(None, False) as runner:
            found[name] = status(_context(config, name, output_dir, runner))
    return found


def _context(
    config: Config,
    name: str,
    output_dir: Path,
    runner: Runner,
    rebuild: set[str] | None = None,
    keep_dev: bool = False,
) -> Context:
    return Context(
        name,
        config.images[name],
        config.machine,
        config.source,
        output_dir,
        config.build.cache_dir,
        runner,
        frozenset(rebuild or ()),
        keep_dev,
    )


def inspect(image: Path, identifier: str | None = None, debug: bool = False) -> InspectReport:
    """Facts about an image and the Stage4 requirement checks; does not change the image."""
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    with _runner(None, debug) as runner:
        return inspect_image(image, identifier, runner)


def diff(a: Path, b: Path, files: bool = False, debug: bool = False) -> diff_mod.DiffResult:
    """What changed from A to B (manifests, built images or exported revisions); see stage4.diff."""
    with _runner(None, debug) as runner:
        return diff_mod.diff(a, b, files=files, runner=runner)


def boot(
    config: Config,
    image: Path,
    via: str = "bootloader",
    kernel: Path | None = None,
    initrd: Path | None = None,
    identifier: str | None = None,
    writable: bool = False,
    timeout: float = 600,
    serial_log: Path | None = None,
    firmware: str = "bios",
    debug: bool = False,
    screenshot: Path | None = None,
    kernel_args: tuple[str, ...] = (),
) -> BootResult:
    """Boot an image in qemu (read-only unless writable) and wait for its userspace marker; with
    `screenshot`, a desktop image's display manager must be active and its screen is saved there (PNG).
    `kernel_args` go last on the command line of a boot via kernel."""
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    if kernel_args and via != "kernel":
        raise InputError(
            "--kernel-arg needs --via kernel (or --kernel): the image's bootloader has its own command line"
        )
    qemu.with_kernel_args("", kernel_args)
    check_screenshot_path(screenshot)
    if via not in ("bootloader", "kernel"):
        raise InputError(f"--via {via!r}: expected 'bootloader' or 'kernel'")
    if firmware not in ("bios", "uefi"):
        raise InputError(f"--firmware {firmware!r}: expected 'bios' or 'uefi'")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    serial_log = (
        serial_log or image.parent / "logs" / f"boot-{image.stem}-{via}-{firmware}-{stamp}.serial.log"
    )
    try:
        serial_log.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(serial_log.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise InputError(
            f"{serial_log.parent}: cannot write the boot logs there ({exc.strerror}); give --log FILE"
        ) from None
    manifest = manifests.of_image(image)
    identifier = identifier or manifest.get("identifier")
    if kernel is None and manifest.get("kernel") and Path(manifest["kernel"]).is_file():
        kernel, initrd = (
            Path(manifest["kernel"]),
            Path(manifest["initramfs"]),
        )  # the dev run's, as export has them
    with (
        _runner(serial_log.with_suffix("").with_suffix(".stage4.log"), debug) as runner,
        tempfile.TemporaryDirectory(prefix="stage4-boot-") as tmp,
    ):
        needs_kernel = via == "kernel" or config.machine.accelerator == "auto"  # the KVM probe boots it
        if identifier is None or (kernel is None and needs_kernel):
            with runner.display.step(f"read {image.name}"), raw_view(image, runner) as raw:
                identifier = identifier or detect_identifier(partitions(raw, runner)[1]) or DEFAULT_IDENTIFIER
                if kernel is None and needs_kernel:
                    kernel, initrd = extract_boot_files(raw, Path(tmp), runner, identifier)
        accelerator = accel.choose(config.machine.accelerator.value, kernel, runner, config.build.cache_dir)
        spec = BootSpec(
            image,
            accelerator,
            config.machine.cpus,
            config.machine.memory >> 20,
            serial_log,
            writable=writable,
            timeout=timeout,
            firmware=firmware,
            screenshot=screenshot,
        )
        if via == "kernel":
            spec.kernel, spec.initrd = kernel, initrd
            spec.append = qemu.with_kernel_args(
                f"root=PARTLABEL={identifier} ro console=ttyS0,115200n8 panic=-1", kernel_args
            )
        with runner.display.step(
            f"boot {image.name} via {via} ({firmware}) on {accelerator}, waiting for userspace"
        ):
            return qemu.boot(spec, runner)


def check_screenshot_path(path: Path | None) -> None:
    """A screenshot goes to a .png file in an existing, writable folder (checked before the boot)."""
    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise InputError(f"--screenshot {path}: expected a file name ending in .png")
    folder = path.absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(f"--screenshot {path}: {folder} is not a writable folder")


def netboot(
    config: Config,
    store: Path,
    name: str,
    rid: int | None = None,
    servers: tuple[str, ...] = (),
    timeout: float = 600,
    boot_dir: Path | None = None,
    serial_log: Path | None = None,
    debug: bool = False,
    screenshot: Path | None = None,
    active: bool = False,
    local_disk: str | None = None,
    persistent: bool = False,
    boots: int = 1,
    kernel_args: tuple[str, ...] = (),
) -> netboot_mod.NetbootResult:
    """Boot revision `rid` (default: the newest) of `name` from `store` in qemu as a client does: boot
    files over HTTP, the image over DNBD3, both on 127.0.0.1 behind qemu's user network; exits only
    with the userspace marker and / checked to be the copy-on-write device over xloop over /dev/dnbd0.

    `servers` are DNBD3 servers on this machine (HOST:PORT, in the order the client tries them);
    none: a development server for `store` on a free loopback port. `active`: through `<boot-dir>/ipxe`.
    `local_disk` (SIZE or FILE; `persistent`: kept across boots) holds the writable layer, else RAM.
    `kernel_args` go last on the entry's command line.
    """
    check_screenshot_path(screenshot)
    qemu.with_kernel_args("", kernel_args)
    revision = netboot_mod.find(store, name, rid, boot_dir, active=active)
    targets = [netboot_mod.loopback_server(server) for server in servers]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    leaf = name.rsplit("/", 1)[-1]
    logs = config.build.output_dir.absolute() / "netboot"
    serial_log = serial_log or logs / f"{leaf}.r{revision.rid}-{stamp}-{os.getpid()}.serial.log"
    with (
        _runner(serial_log.with_suffix("").with_suffix(".stage4.log"), debug) as runner,
        tempfile.TemporaryDirectory(prefix="stage4-netboot-") as tmp,
    ):
        return netboot_mod.netboot(
            revision,
            targets,
            config.machine,
            config.build.cache_dir,
            timeout,
            serial_log,
            Path(tmp),
            runner,
            screenshot=screenshot,
            disk_request=DiskRequest(local_disk, persistent) if local_disk is not None else None,
            boots=boots,
            kernel_args=kernel_args,
        )


def distributions() -> list[type[distributions_mod.Distribution]]:
    """What stage4 can build: the catalog, one entry per distribution release."""
    return [distributions_mod.get(name) for name in distributions_mod.names()]


# ----- publishing and serving: the export, the store's revisions, DNBD3 servers ------------------------


def export(
    image: Path,
    store: str,
    name: str,
    *,
    debug: bool = False,
    **options: Unpack[export_publish.PrepareOptions],
) -> Publication:
    """Publish a standalone qcow2 as a new revision of `name` in a DNBD3 store (local or [user@]host:/path).

    Every input is checked first (bad input raises InputError before anything is written); the options are
    those of export.publish.prepare (rid, servers, kernel, initrd, boot_dir, activate, manifest, ...).
    """
    display = Display(debug=debug)
    planned = export_publish.prepare(image, store, name, runner=Runner(display), **options)
    with display.step(f"export {image} as {name}"):
        publication = planned.run()
    for warning in publication.warnings:
        display.info(f"warning: {warning}")
    return publication


def revision_changes(store: str, name: str, rid: int) -> str | None:
    """What revision `rid` of `name` changes against the previous complete one (local stores), as text."""
    if ":" in store and not Path(store).exists():
        return None  # a remote store: its records are on the store host
    earlier = [s.rid for s in revisions(Path(store), name) if s.complete and s.rid < rid]
    new = export_records.read_record(Path(store), name, rid)
    old = export_records.read_record(Path(store), name, earlier[-1]) if earlier else None
    return diff_mod.summary(old, new) if old and new else None


def revisions(store: Path, name: str) -> list[export_revisions.RevisionState]:
    """Every revision of `name` in a local store, complete or not (image, .crc, boot files, record)."""
    local = Store(store)
    local.check()
    validate_name(name)
    return export_revisions.states(local, name)


def repair_revisions(store: Path, name: str) -> list[int]:
    """Withdraw the incomplete revisions of `name` a crashed export left; returns their numbers."""
    local = Store(store)
    local.check()
    validate_name(name)
    return export_revisions.repair(local, name)


def prune(
    store: Path,
    name: str,
    keep: int,
    protect: tuple[str, ...] = (),
    dry_run: bool = False,
    reload_pidfile: Path | None = None,
    servers: tuple[str, ...] | None = None,
    force: bool = False,
) -> list[int]:
    """Remove old revisions of `name`, keeping the newest `keep`, the protected and the active one, and any
    that a DNBD3 server (`servers`, default: those recorded at export) reports users for, unless `force`."""
    validate_name(name)
    return export_revisions.prune(
        store, name, keep, protect, dry_run=dry_run, pidfile=reload_pidfile, servers=servers, force=force
    )


def serve(
    store: Path,
    host: str,
    port: int,
    alt_servers: tuple[str, ...] = (),
    log: Callable[[str], None] | None = None,
) -> DevServer:
    """A development DNBD3 server for `store` (not started: call serve_forever())."""
    if not store.is_dir():
        raise InputError(f"store {store}: not a directory")
    entries = []
    for item in alt_servers:
        alt_host, alt_port = protocol.parse_address(item)
        try:
            entries.append(protocol.ServerEntry(alt_host, alt_port))
        except ValueError:
            raise InputError(f"--alt-server {item!r}: needs an IP address") from None
    return DevServer(store, host, port, alt_servers=entries, log=log)


def dnbd3_images(server: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The images a DNBD3 server (host[:port]) has loaded (GET /query?q=images)."""
    return dnbd3_client.query_images(server, timeout=timeout)


def dnbd3_verify(
    server: str, name: str, rid: int = 0, **options: Unpack[VerifyOptions]
) -> dnbd3_verify_mod.VerifyReport:
    """Check image `name` on a DNBD3 server the way a client reads it (dnbd3.verify.verify's options)."""
    return dnbd3_verify_mod.verify(server, name, rid, **options)


def dnbd3_download(
    server: str, name: str, output: Path, rid: int = 0, timeout: float = 10.0
) -> tuple[int, int, str]:
    """Download image `name` from a DNBD3 server: (rid, size, sha256)."""
    return dnbd3_verify_mod.download(server, name, output, rid, timeout=timeout)


def render(
    config: Config,
    targets: list[str],
    output: Path,
    overrides: dict[str, object],
    debug: bool = False,
    **options: Unpack[RenderOptions],
) -> list[packer.RenderedTemplate]:
    """Packer templates and answer files for distributions or images of the config (their settings, then
    `overrides` and the options of builders.packer.targets_for: efi, iso, iso_checksum, ssh_timeout)."""
    chosen = packer.targets_for(
        targets or distributions_mod.installer_names(), config.images, overrides=overrides, **options
    )
    return packer.render_tree(output, chosen, config.machine, Runner(Display(debug=debug)))
