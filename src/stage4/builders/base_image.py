"""The base step: a generic OS installation in a standalone qcow2 (mmdebstrap, or an installer by Packer).

Each step leaves a stamp in the work directory (in the cache, never in the output directory), so an
interrupted build continues from the last finished step; the output directory only ever receives a
finished image, renamed into place after it was completely written.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NotRequired, TypedDict

from stage4 import distributions
from stage4.builders import bootstrap, disk, grub, initramfs, packer, packer_iso, packer_run, packer_template
from stage4.config import BuilderKind, MachineConfig, format_size
from stage4.distributions import installer
from stage4.distributions.apt import AptDistribution
from stage4.errors import MISSING, ConfigError, InputError, StepFailed
from stage4.fsutil import (
    dir_size,
    file_facts,
    mounts_below,
    place_atomically,
    remove_tree,
    temporary_sibling,
    unmount_below,
)
from stage4.identity import identity as identity_of
from stage4.identity import source_digest
from stage4.image.inspect import inspect_image
from stage4.machine import accel
from stage4.runner import Runner
from stage4.timing import timed

if TYPE_CHECKING:
    from stage4.context import Context

BASE_IMAGE = "base.qcow2"
# Room for the filesystem's own metadata and for first-boot writes, on top of the files.
ROOT_OVERHEAD = 1.15
ROOT_SLACK = 128 << 20
TREE_FROM = "rootfs.from"  # in the work directory: the base whose kept tree this one was updated from


class PartitionFacts(TypedDict):
    number: int
    name: str
    type: str  # GPT type GUID
    start: int  # bytes
    size: int  # bytes


class DiskFacts(TypedDict):
    """What the base's manifest tells of the system on the disk."""

    kernel_versions: list[str]
    packages: dict[str, str] | None  # name -> version; None: not read back (installer-built images)
    partitions: list[PartitionFacts]
    rootfs_bytes: NotRequired[int]  # the bootstrapped tree's size


def bootstrap_plan(ctx: Context) -> bootstrap.BootstrapPlan:
    distribution = distributions.get(ctx.image.distribution)
    if not issubclass(distribution, AptDistribution) or not distribution.bootstrappable:
        raise ConfigError(
            ctx.source,
            f"images.{ctx.name}.builder",
            "bootstrap",
            f"{distribution.name} cannot be bootstrapped; use builder = 'packer'",
        )
    return bootstrap.BootstrapPlan(
        distribution,
        ctx.image.mirror,
        ctx.image.filesystem.value,
        ctx.image.identifier,
        ctx.image.packages,
        hostname=ctx.name,
    )


def identity_inputs(ctx: Context) -> dict[str, object]:
    image = ctx.image
    inputs: dict[str, object]
    if image.builder is BuilderKind.packer:
        inputs = {
            "builder": "packer",
            "distribution": image.distribution,
            "iso": image.iso,
            "iso_checksum": image.iso_checksum,
            "efi": image.efi,
            "identifier": image.identifier,
            "filesystem": image.filesystem.value,
            "packages": sorted(image.packages),
            "mirror": image.mirror,
        }
    else:
        inputs = {"builder": "bootstrap", **bootstrap_plan(ctx).identity_inputs()}
    return {**inputs, "disk_size": ctx.machine.disk_size}


def identity(ctx: Context) -> str:
    recipe = (
        (packer, packer_iso, packer_run, packer_template, installer)
        if ctx.image.builder is BuilderKind.packer
        else (bootstrap, initramfs, disk, grub)
    )
    return identity_of(
        "base", {**identity_inputs(ctx), "recipe": source_digest(*recipe, sys.modules[__name__])}
    )


def build(ctx: Context, base_id: str) -> dict[str, object]:
    """Build the base into the image folder; returns the base's part of its manifest."""
    display = ctx.runner.display
    timings: dict[str, float] = {}
    if ctx.image.builder is BuilderKind.packer:
        work = ctx.cache_dir / "work" / f"{ctx.name}-{base_id[:16]}"
        work.mkdir(parents=True, exist_ok=True)
        build_disk = _packer_base
    else:
        work = _bootstrap_work_dir(ctx)
        build_disk = _bootstrap_base
    try:
        disk_file, facts = build_disk(ctx, base_id, work, timings)
        ctx.image_dir.mkdir(parents=True, exist_ok=True)
        target = ctx.image_dir / BASE_IMAGE
        with temporary_sibling(target) as partial:
            with display.step(f"{ctx.name}: compress to qcow2"), timed(timings, "compress"):
                compress(disk_file, partial, ctx.runner)
            place_atomically(partial, target)
    finally:
        unmount_below(work)
    updated_from = (work / TREE_FROM).read_text() if (work / TREE_FROM).exists() else None
    if ctx.image.builder is BuilderKind.bootstrap:
        keep_tree(ctx, bootstrap_plan(ctx), work / "rootfs", base_id)
    remove_tree(work)
    files = file_facts(ctx.image_dir, BASE_IMAGE)
    return {
        "inputs": identity_inputs(ctx),
        **({"from": updated_from} if updated_from else {}),
        **facts,
        "image": {
            "file": BASE_IMAGE,
            "format": "qcow2",
            "compression": "zstd",
            "virtual_size": ctx.machine.disk_size,
            **files[BASE_IMAGE],
        },
        "files": files,
        "timings_seconds": timings,
    }


def _bootstrap_work_dir(ctx: Context) -> Path:
    plan = bootstrap_plan(ctx)
    if reason := bootstrap.check_mirror_reachable(plan):
        raise ConfigError(
            ctx.source,
            f"images.{ctx.name}.mirror",
            ctx.image.mirror or MISSING,
            f"mirror unreachable ({reason}); {plan.distribution.name} needs a reachable mirror",
        )
    keyring = plan.distribution.keyring
    if keyring and not Path(keyring).is_file():
        raise ConfigError(
            ctx.source,
            f"images.{ctx.name}.distribution",
            plan.distribution.name,
            f"verifying its mirror needs the keyring {keyring}, which this host lacks; "
            f"install {plan.distribution.keyring_package}",
        )
    # The tree depends on fewer inputs than the disk: a new disk size reuses it.
    rootfs_id = identity_of("rootfs", {**plan.tree_inputs(), "recipe": source_digest(bootstrap, initramfs)})
    work = ctx.cache_dir / "work" / f"{ctx.name}-{rootfs_id[:16]}"
    _remove_stale_work(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def tree_key(plan: bootstrap.BootstrapPlan) -> str:
    return identity_of(
        "kept-tree", {**bootstrap.tree_key_inputs(plan), "recipe": source_digest(bootstrap, initramfs)}
    )


def _kept_tree_dir(ctx: Context, plan: bootstrap.BootstrapPlan) -> Path:
    return ctx.cache_dir / "trees" / f"{ctx.name}-{tree_key(plan)[:16]}"


def keep_tree(ctx: Context, plan: bootstrap.BootstrapPlan, rootfs: Path, base_id: str) -> None:
    """Keep a finished base's root tree in the cache (moved, not copied), with the packages it was made
    of: the next build of this image that differs only in its package list starts from it."""
    if not rootfs.is_dir() or mounts_below(rootfs):
        return
    kept = _kept_tree_dir(ctx, plan)
    _remove_stale_work(kept)  # one kept tree per image: those of older configs go
    remove_tree(kept)
    kept.mkdir(parents=True)
    rootfs.rename(kept / "rootfs")
    record = {"base": base_id, "packages": plan.packages()}
    (kept / "tree.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def claim_kept_tree(
    ctx: Context, plan: bootstrap.BootstrapPlan, rootfs: Path
) -> tuple[str, list[str]] | None:
    """Move the kept tree of this image's key (if any) to `rootfs`: its base identity and package list.
    Claimed, not copied (this cache's file system has no reflinks): the build lock is per cache and image,
    and a build that fails with it leaves no kept tree, so the next one bootstraps from scratch."""
    kept = _kept_tree_dir(ctx, plan)
    record_path = kept / "tree.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        base_id, packages = str(record["base"]), [str(p) for p in record["packages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        record_path.unlink(missing_ok=True)  # claimed, or unreadable: either way no longer kept
    if not (kept / "rootfs").is_dir():
        return None
    (kept / "rootfs").rename(rootfs)
    remove_tree(kept)
    return base_id, packages


def _bootstrap_base(
    ctx: Context, base_id: str, work: Path, timings: dict[str, float]
) -> tuple[Path, DiskFacts]:
    plan, display = bootstrap_plan(ctx), ctx.runner.display
    rootfs, raw = work / "rootfs", work / "disk.raw"
    layout = disk.DiskLayout.plan(ctx.machine.disk_size, plan.identifier)
    if not (work / "rootfs.done").exists():
        remove_tree(rootfs)
        (work / TREE_FROM).unlink(missing_ok=True)
        # A file:// mirror is visible to mmdebstrap's apt (outside the chroot), not to the chroot's.
        local_mirror = any(" file:" in line for line in plan.sources())
        kept = None if "base" in ctx.rebuild or local_mirror else claim_kept_tree(ctx, plan, rootfs)
        if kept is not None:
            previous_id, previous_packages = kept
            added, removed = bootstrap.package_difference(plan.packages(), previous_packages)
            with (
                display.step(
                    f"{ctx.name}: update the kept tree of base {previous_id[:12]} "
                    f"(packages: {' '.join([*('+' + p for p in added), *('-' + p for p in removed)])})"
                ),
                timed(timings, "update"),
            ):
                updated = bootstrap.update_tree(
                    plan, rootfs, work, ctx.cache_dir, ctx.runner, previous_packages
                )
            if not updated:
                display.info(f"{ctx.name}: the mirror has newer packages than the kept tree: bootstrap")
                unmount_below(work)
                remove_tree(rootfs)
                kept = None
            else:
                (work / TREE_FROM).write_text(previous_id)
        if kept is None:
            with (
                display.step(f"{ctx.name}: bootstrap {plan.distribution.pretty_name}"),
                timed(timings, "bootstrap"),
            ):
                bootstrap.run_mmdebstrap(plan, rootfs, work, ctx.cache_dir, ctx.runner)
        (work / "rootfs.done").touch()
    kernels = bootstrap.kernel_versions(rootfs)
    if not kernels:
        raise InputError(f"images.{ctx.name}: the bootstrap installed no kernel in /boot")
    accel.keep_probe_kernel(rootfs / "boot" / f"vmlinuz-{kernels[-1]}", ctx.cache_dir)
    _check_fits(ctx, rootfs, layout)
    disk_stamp = work / "disk.done"
    if not disk_stamp.exists() or disk_stamp.read_text() != base_id:
        disk_stamp.unlink(missing_ok=True)
        with (
            display.step(f"{ctx.name}: assemble GPT disk ({plan.filesystem}, root '{plan.identifier}')"),
            timed(timings, "disk"),
        ):
            grub.install_files(
                rootfs, plan.identifier, kernels[-1], f"{plan.distribution.pretty_name} ({ctx.name})"
            )
            disk.create_disk(layout, raw, ctx.runner)
            disk.write_root_filesystem(layout, raw, rootfs, plan.filesystem, work, ctx.runner)
            efi = work / "BOOTX64.EFI"
            grub.make_image("x86_64-efi", efi, plan.identifier, work, ctx.runner)
            disk.write_esp(layout, raw, efi, work, ctx.runner)
            grub.embed_bios(layout, raw, work, plan.identifier, ctx.runner)
        disk_stamp.write_text(base_id)
    facts: DiskFacts = {
        "kernel_versions": kernels,
        "packages": bootstrap.installed_packages(rootfs, ctx.runner),
        "partitions": [
            {"number": p.number, "name": p.name, "type": p.type_guid, "start": p.offset, "size": p.bytes}
            for p in (layout.bios_boot, layout.esp, layout.root)
        ],
        "rootfs_bytes": dir_size(rootfs),
    }
    return raw, facts


def _packer_base(ctx: Context, base_id: str, work: Path, timings: dict[str, float]) -> tuple[Path, DiskFacts]:
    """An installer run under Packer; the result must pass the Stage4 checks before it is published."""
    accelerator = accel.choose(ctx.machine.accelerator.value, None, ctx.runner, ctx.cache_dir)
    with (
        ctx.runner.display.step(f"{ctx.name}: install {ctx.image.distribution} with Packer on {accelerator}"),
        timed(timings, "install"),
    ):
        installed = packer_run.build_base_with_packer(
            ctx.name,
            ctx.image,
            ctx.machine,
            work,
            ctx.runner,
            accelerator,
            ctx.image.iso,
            ctx.image.iso_checksum,
            ctx.runner.display.debug,
            efi=ctx.image.efi,
            ssh_timeout=ctx.image.installer_timeout,
            cache_dir=ctx.cache_dir / "packer",
        )
    with ctx.runner.display.step(f"{ctx.name}: check the installed image"):
        report = inspect_image(installed, ctx.image.identifier, ctx.runner)
    failed = [p for p in report.problems() if not p.startswith(("compression", "format"))]
    if failed:
        raise StepFailed(
            f"{ctx.name}: Stage4 checks of the installed image", "; ".join(failed), ctx.runner.log_path
        )
    facts: DiskFacts = {
        "kernel_versions": sorted(report.kernels),
        "packages": None,  # not read back from installer-built images yet
        "partitions": [
            {"number": p.number, "name": p.name, "type": p.type_guid, "start": p.offset, "size": p.size}
            for p in report.partitions
        ],
    }
    return installed, facts


def compress(raw: Path, target: Path, runner: Runner) -> None:
    """A standalone qcow2 v3, zstd-compressed (xloop reads zlib and zstd); -W and -m use both cores."""
    runner.run(
        [
            "qemu-img",
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compression_type=zstd",
            "-W",
            "-m",
            "8",
            raw,
            target,
        ],
        step="compress",
    )


def check_disk_fits(machine: MachineConfig, cache_dir: Path, source: str) -> None:
    """Before any step: the raw disk is a sparse file in the work folder, whose filesystem must allow
    its size."""
    work = cache_dir / "work"
    try:
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work) as probe:
            too_large = _truncate_error(probe, machine.disk_size)
    except OSError as exc:
        raise ConfigError(
            source, "build.cache_dir", str(cache_dir), f"cannot write {work}: {exc.strerror}"
        ) from None
    if too_large:
        raise ConfigError(
            source,
            "machine.disk_size",
            format_size(machine.disk_size),
            f"the filesystem of {work} cannot hold a disk file that large ({too_large})",
        )


def _truncate_error(handle: BinaryIO, size: int) -> str | None:
    try:
        handle.truncate(size)
    except OSError as exc:
        return exc.strerror
    return None


def _check_fits(ctx: Context, rootfs: Path, layout: disk.DiskLayout) -> None:
    needed = int(dir_size(rootfs) * ROOT_OVERHEAD) + ROOT_SLACK
    if needed > layout.root.bytes:
        minimum = -(-(needed + layout.root.offset + (1 << 20)) // (1 << 30))
        raise ConfigError(
            ctx.source,
            "machine.disk_size",
            f"{ctx.machine.disk_size >> 20}M",
            f"too small for the root filesystem of images.{ctx.name} "
            f"(needs {needed >> 20} MiB; use at least '{minimum}G')",
        )


def _remove_stale_work(current: Path) -> None:
    """Work trees of other identities of this image are leftovers of an older config."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    if current.parent.is_dir():
        for other in current.parent.iterdir():
            if other != current and other.name.startswith(prefix) and len(other.name) == len(current.name):
                remove_tree(other)
