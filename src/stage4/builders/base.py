"""Building the base layer of an image: a generic OS installation in a standalone qcow2.

Each step leaves a stamp in the work directory (in the cache, never in the output directory), so an
interrupted build continues from the last finished step; the output directory only ever receives a
finished image, renamed into place after it was completely written.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from stage4 import __version__, distributions
from stage4.boot import accel
from stage4.builders import bootstrap, disk, grub, initramfs, packer, packer_template
from stage4.config import BuilderKind, ImageConfig, MachineConfig, format_size
from stage4.distributions import installer
from stage4.distributions.apt import AptDistribution
from stage4.errors import MISSING, ConfigError, InputError, StepFailed
from stage4.image.inspect import inspect_image
from stage4.fsutil import dir_size, place_atomically, remove_tree, sha256_file, temporary_sibling, unmount_below, write_json_atomically
from stage4.identity import identity, source_digest
from stage4.runner import Runner

BASE_IMAGE = "base.qcow2"
BASE_MANIFEST = "base.json"
# Room for the filesystem's own metadata and for first-boot writes, on top of the files.
ROOT_OVERHEAD = 1.15
ROOT_SLACK = 128 << 20


@dataclass
class BaseResult:
    name: str
    image: Path
    manifest: dict
    reused: bool

    @property
    def identity(self) -> str:
        return self.manifest["identity"]


@dataclass
class BaseJob:
    """Everything one base build needs; built by the API from the config."""

    name: str
    image: ImageConfig
    machine: MachineConfig
    source: str  # the config file, for error messages
    output_dir: Path
    cache_dir: Path
    runner: Runner
    rebuild: bool = False

    @property
    def image_dir(self) -> Path:
        return self.output_dir / self.name

    def plan(self) -> bootstrap.BootstrapPlan:
        distribution = distributions.get(self.image.distribution)
        if not issubclass(distribution, AptDistribution) or not distribution.bootstrappable:
            raise ConfigError(self.source, f"images.{self.name}.builder", "bootstrap",
                              f"{distribution.name} cannot be bootstrapped; use builder = 'packer'")
        return bootstrap.BootstrapPlan(distribution, self.image.mirror, self.image.filesystem.value,
                                       self.image.identifier, self.image.packages, hostname=self.name)

    def identity_inputs(self) -> dict:
        if self.image.builder is BuilderKind.packer:
            inputs = {"builder": "packer", "distribution": self.image.distribution, "iso": self.image.iso,
                      "iso_checksum": self.image.iso_checksum, "efi": self.image.efi,
                      "identifier": self.image.identifier, "filesystem": self.image.filesystem.value,
                      "packages": sorted(self.image.packages), "mirror": self.image.mirror}
        else:
            inputs = {"builder": "bootstrap", **self.plan().identity_inputs()}
        return {**inputs, "disk_size": self.machine.disk_size}

    def identity(self) -> str:
        recipe = (packer, packer_template, installer) if self.image.builder is BuilderKind.packer \
            else (bootstrap, initramfs, disk, grub)
        return identity("base", {**self.identity_inputs(), "recipe": source_digest(*recipe, sys.modules[__name__])})


def reusable(image_dir: Path, wanted_identity: str) -> dict | None:
    """The manifest of the finished base in `image_dir` if it has this identity and its image is intact."""
    manifest_path, image_path = image_dir / BASE_MANIFEST, image_dir / BASE_IMAGE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("identity") != wanted_identity or not image_path.exists():
        return None
    if image_path.stat().st_size != manifest["image"]["size"] or sha256_file(image_path) != manifest["image"]["sha256"]:
        return None
    return manifest


def build_base(job: BaseJob) -> BaseResult:
    # Two builds of one image would share work trees and output files: the caller holds the image's build
    # lock for its whole build, layers included (workdirs.image_build).
    return _build_base_locked(job)


def _build_base_locked(job: BaseJob) -> BaseResult:
    base_id = job.identity()
    display = job.runner.display
    if not job.rebuild and (manifest := reusable(job.image_dir, base_id)):
        display.info(f"{job.name}: base {base_id[:16]} is up to date, reusing {job.image_dir / BASE_IMAGE}")
        return BaseResult(job.name, job.image_dir / BASE_IMAGE, manifest, reused=True)
    timings: dict[str, float] = {}
    if job.image.builder is BuilderKind.packer:
        work = job.cache_dir / "work" / f"{job.name}-{base_id[:16]}"
        work.mkdir(parents=True, exist_ok=True)
        build = _packer_base
    else:
        work = _bootstrap_work_dir(job)
        build = _bootstrap_base
    try:
        disk_file, facts = build(job, base_id, work, timings)
        job.image_dir.mkdir(parents=True, exist_ok=True)
        target = job.image_dir / BASE_IMAGE
        with temporary_sibling(target) as partial:
            with display.step(f"{job.name}: compress to qcow2"), _timed(timings, "compress"):
                compress(disk_file, partial, job.runner)
            manifest = {
                "kind": "base",
                "name": job.name,
                "identity": base_id,
                "inputs": job.identity_inputs(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "stage4_version": __version__,
                "host": platform.node(),
                **facts,
                "image": {"file": BASE_IMAGE, "format": "qcow2", "compression": "zstd",
                          "virtual_size": job.machine.disk_size, "size": partial.stat().st_size,
                          "sha256": sha256_file(partial)},
                "timings_seconds": timings,
            }
            place_atomically(partial, target)
        write_json_atomically(job.image_dir / BASE_MANIFEST, manifest)
    finally:
        unmount_below(work)
    remove_tree(work)
    return BaseResult(job.name, target, manifest, reused=False)


def _bootstrap_work_dir(job: BaseJob) -> Path:
    plan = job.plan()
    if reason := bootstrap.check_mirror_reachable(plan):
        raise ConfigError(job.source, f"images.{job.name}.mirror", job.image.mirror or MISSING,
                          f"mirror unreachable ({reason}); {plan.distribution.name} needs a reachable mirror")
    keyring = plan.distribution.keyring
    if keyring and not Path(keyring).is_file():
        raise ConfigError(job.source, f"images.{job.name}.distribution", plan.distribution.name,
                          f"verifying its mirror needs the keyring {keyring}, which this host lacks; "
                          f"install {plan.distribution.keyring_package}")
    # The tree depends on fewer inputs than the disk: a new disk size reuses it.
    rootfs_id = identity("rootfs", {**plan.tree_inputs(), "recipe": source_digest(bootstrap, initramfs)})
    work = job.cache_dir / "work" / f"{job.name}-{rootfs_id[:16]}"
    _remove_stale_work(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _bootstrap_base(job: BaseJob, base_id: str, work: Path, timings: dict[str, float]) -> tuple[Path, dict]:
    plan, display = job.plan(), job.runner.display
    rootfs, raw = work / "rootfs", work / "disk.raw"
    layout = disk.DiskLayout.plan(job.machine.disk_size, plan.identifier)
    if not (work / "rootfs.done").exists():
        remove_tree(rootfs)
        with display.step(f"{job.name}: bootstrap {plan.distribution.pretty_name}"), _timed(timings, "bootstrap"):
            bootstrap.run_mmdebstrap(plan, rootfs, work, job.cache_dir, job.runner)
        (work / "rootfs.done").touch()
    kernels = bootstrap.kernel_versions(rootfs)
    if not kernels:
        raise InputError(f"images.{job.name}: the bootstrap installed no kernel in /boot")
    accel.keep_probe_kernel(rootfs / "boot" / f"vmlinuz-{kernels[-1]}", job.cache_dir)
    _check_fits(job, rootfs, layout)
    disk_stamp = work / "disk.done"
    if not disk_stamp.exists() or disk_stamp.read_text() != base_id:
        disk_stamp.unlink(missing_ok=True)
        with display.step(f"{job.name}: assemble GPT disk ({plan.filesystem}, root '{plan.identifier}')"), \
                _timed(timings, "disk"):
            grub.install_files(rootfs, plan.identifier, kernels[-1], f"{plan.distribution.pretty_name} ({job.name})")
            disk.create_disk(layout, raw, job.runner)
            disk.write_root_filesystem(layout, raw, rootfs, plan.filesystem, work, job.runner)
            efi = work / "BOOTX64.EFI"
            grub.make_image("x86_64-efi", efi, plan.identifier, work, job.runner)
            disk.write_esp(layout, raw, efi, work, job.runner)
            grub.embed_bios(layout, raw, work, plan.identifier, job.runner)
        disk_stamp.write_text(base_id)
    facts = {
        "kernel_versions": kernels,
        "packages": bootstrap.installed_packages(rootfs, job.runner),
        "partitions": [{"number": p.number, "name": p.name, "type": p.type_guid, "start": p.offset, "size": p.bytes}
                       for p in (layout.bios_boot, layout.esp, layout.root)],
        "rootfs_bytes": dir_size(rootfs),
    }
    return raw, facts


def _packer_base(job: BaseJob, base_id: str, work: Path, timings: dict[str, float]) -> tuple[Path, dict]:
    """An installer run under Packer; the result must pass the Stage4 checks before it is published."""
    accelerator = accel.choose(job.machine.accelerator.value, None, job.runner, job.cache_dir)
    with job.runner.display.step(f"{job.name}: install {job.image.distribution} with Packer on {accelerator}"), \
            _timed(timings, "install"):
        installed = packer.build_base_with_packer(
            job.name, job.image, job.machine, work, job.runner, accelerator, job.image.iso, job.image.iso_checksum,
            job.runner.display.debug, efi=job.image.efi, ssh_timeout=job.image.installer_timeout,
            cache_dir=job.cache_dir / "packer")
    with job.runner.display.step(f"{job.name}: check the installed image"):
        report = inspect_image(installed, job.image.identifier, job.runner)
    failed = [p for p in report.problems() if not p.startswith(("compression", "format"))]
    if failed:
        raise StepFailed(f"{job.name}: Stage4 checks of the installed image", "; ".join(failed),
                         job.runner.log_path)
    facts = {
        "kernel_versions": sorted(report.kernels),
        "packages": None,  # not read back from installer-built images yet
        "partitions": [{"number": p.number, "name": p.name, "type": p.type_guid, "start": p.offset, "size": p.size}
                       for p in report.partitions],
    }
    return installed, facts


def compress(raw: Path, target: Path, runner: Runner) -> None:
    """A standalone qcow2 v3, zstd-compressed (xloop reads zlib and zstd); -W and -m use both cores."""
    runner.run(["qemu-img", "convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                "-W", "-m", "8", raw, target], step="compress")


def check_disk_fits(machine: MachineConfig, cache_dir: Path, source: str) -> None:
    """Before any step: the raw disk is a sparse file in the work folder, whose filesystem must allow its size."""
    work = cache_dir / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work) as probe:
            too_large = _truncate_error(probe, machine.disk_size)
    except OSError as exc:
        raise ConfigError(source, "build.cache_dir", str(cache_dir), f"cannot write {work}: {exc.strerror}") from None
    if too_large:
        raise ConfigError(source, "machine.disk_size", format_size(machine.disk_size),
                          f"the filesystem of {work} cannot hold a disk file that large ({too_large})")


def _truncate_error(handle: BinaryIO, size: int) -> str | None:
    try:
        handle.truncate(size)
    except OSError as exc:
        return exc.strerror
    return None


def _check_fits(job: BaseJob, rootfs: Path, layout: disk.DiskLayout) -> None:
    needed = int(dir_size(rootfs) * ROOT_OVERHEAD) + ROOT_SLACK
    if needed > layout.root.bytes:
        minimum = -(-(needed + layout.root.offset + (1 << 20)) // (1 << 30))
        raise ConfigError(job.source, "machine.disk_size", f"{job.machine.disk_size >> 20}M",
                          f"too small for the root filesystem of images.{job.name} "
                          f"(needs {needed >> 20} MiB; use at least '{minimum}G')")


def _remove_stale_work(current: Path) -> None:
    """Work trees of other identities of this image are leftovers of an older config."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    if current.parent.is_dir():
        for other in current.parent.iterdir():
            if other != current and other.name.startswith(prefix) and len(other.name) == len(current.name):
                remove_tree(other)


class _timed:
    def __init__(self, timings: dict[str, float], key: str):
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = round(time.monotonic() - self.start, 1)
