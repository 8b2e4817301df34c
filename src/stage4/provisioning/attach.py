"""Attaching a qcow2 layer on the host, without nbd, a partition parser or device-mapper.

qemu-storage-daemon exports the qcow2 (with its backing chain) as a raw file through FUSE; a loop device
with offset and size limit gives the root partition; it is mounted, and for a chroot /proc, /sys and /dev
are bound into it, with the host's resolv.conf for apt, a policy-rc.d so that package scripts start no
services and dpkg's force-unsafe-io. Everything is undone in reverse order when the context exits, also
on Interrupted. Each attachment is recorded in the attach folder as it happens (Runner.recording,
stage4/workdirs.py): if stage4 is killed, the next build of the image ends, unmounts and detaches what
is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage4.errors import StepFailed
from stage4.fsutil import fsync_path, mounts_below
from stage4.runner import Runner

EXPORT_WAIT_SECONDS = 30
POLICY_RC_D = "#!/bin/sh\n# stage4: no services start while the layer is provisioned in a chroot\nexit 101\n"
SAVED_RESOLV = "etc/.resolv.conf.stage4-saved"
APT_CACHE_MOUNT = "var/cache/stage4-apt"
APT_CACHE_CONF = "etc/apt/apt.conf.d/00stage4-cache"
# dpkg without an fsync per unpacked file, as mmdebstrap runs it: a crashed build discards the layer
# anyway, and the layer is synced once before it is detached. (Through the FUSE export each fsync is a
# round trip to qemu-storage-daemon.)
DPKG_UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/00stage4-unsafe-io"


def chroot_unavailable() -> str | None:
    """Why a layer cannot be attached on this host (then the VM way serves instead), or None."""
    if os.geteuid() != 0:
        return "attaching needs root"
    for device in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(device):
            return f"{device} is missing"
    for tool in ("qemu-storage-daemon", "losetup", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True)
class RootPartition:
    offset: int
    size: int
    fs_type: str

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], identifier: str, fs_type: str) -> RootPartition:
        for part in manifest["partitions"]:
            if part["name"] == identifier:
                return cls(part["start"], part["size"], fs_type)
        raise StepFailed("attach layer", f"the base manifest names no partition {identifier!r}")


@contextlib.contextmanager
def fuse_export(image: Path, mountpoint: Path, runner: Runner, writable: bool, step: str) -> Iterator[Path]:
    """The qcow2 chain of `image` as one raw file at `mountpoint` while the context lasts.

    A writable export ignores flushes (the file system's journal commits, dpkg's syncs): each one would
    be an fdatasync of the layer file, and a layer whose build did not finish is discarded anyway. The
    layer file is synced once, after the daemon has written everything out and exited.
    """
    mountpoint.parent.mkdir(parents=True, exist_ok=True)
    mountpoint.touch()
    no_flush = ",cache.no-flush=on" if writable else ""
    argv = [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file,filename={image},aio=threads{no_flush}",
        "--blockdev",
        f"driver=qcow2,node-name=disk,file=file{no_flush}",
        "--export",
        (
            f"type=fuse,id=export,node-name=disk,mountpoint={mountpoint},"
            f"writable={'on' if writable else 'off'}"
        ),
    ]
    runner.note("mount", target=str(mountpoint.resolve()), fs_type="fuse")
    with runner.background(argv, step=step, grace=30) as daemon:
        deadline = time.monotonic() + EXPORT_WAIT_SECONDS
        while str(mountpoint.resolve()) not in mounts_below(mountpoint):
            if not daemon.running():
                raise StepFailed(
                    step,
                    "qemu-storage-daemon exited: " + " | ".join(list(daemon.lines)[-5:]),
                    runner.log_path,
                )
            if time.monotonic() > deadline:
                raise StepFailed(step, f"the FUSE export of {image.name} did not appear", runner.log_path)
            time.sleep(0.1)
        try:
            yield mountpoint
        finally:
            # The daemon writes its caches out on SIGTERM; the export is unmounted when it exits.
            os.sync()
    if writable:
        fsync_path(image)


@contextlib.contextmanager
def loop_device(raw: Path, part: RootPartition, runner: Runner, writable: bool, step: str) -> Iterator[str]:
    # Buffered, not --direct-io=on: over qemu-storage-daemon's FUSE export, direct I/O once returned other
    # files' data for the kernel headers a component build read (gcc: "unterminated #ifndef").
    argv = ["losetup", "--find", "--show", "--offset", str(part.offset), "--sizelimit", str(part.size)]
    if not writable:
        argv.append("--read-only")
    device = runner.run([*argv, raw], step=step, capture=True).stdout.strip()
    runner.note("loop", device=device, backing=str(raw.resolve()), offset=part.offset, sizelimit=part.size)
    try:
        yield device
    finally:
        runner.run(["losetup", "--detach", device], step=f"{step} (detach loop device)", check=False)


@contextlib.contextmanager
def mounted(
    device: str, target: Path, fs_type: str, runner: Runner, writable: bool, step: str
) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    options = "rw" if writable else ("ro,norecovery" if fs_type == "xfs" else "ro")
    runner.note("mount", target=str(target.resolve()), device=device)
    runner.run(["mount", "-t", fs_type, "-o", options, device, target], step=step)
    try:
        yield target
    finally:
        os.sync()
        runner.run(["umount", target], step=f"{step} (unmount)", check=False)


@contextlib.contextmanager
def attached(
    image: Path,
    part: RootPartition,
    work: Path,
    runner: Runner,
    *,
    writable: bool,
    step: str = "attach layer",
) -> Iterator[Path]:
    """The root filesystem of the qcow2 `image` mounted below `work`; nothing remains attached afterwards.

    Every command started while it is attached (Ansible in the chroot) is recorded in `work` too.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(runner.recording(work))
        raw = stack.enter_context(fuse_export(image, work / "export.raw", runner, writable, step))
        device = stack.enter_context(loop_device(raw, part, runner, writable, step))
        yield stack.enter_context(mounted(device, work / "root", part.fs_type, runner, writable, step))


@contextlib.contextmanager
def chroot_ready(
    root: Path, runner: Runner, apt_cache: Path | None = None, step: str = "prepare chroot"
) -> Iterator[Path]:
    """Make a mounted root usable as a chroot for package managers; undo it all on exit."""
    with contextlib.ExitStack() as stack:
        for name in ("proc", "sys", "dev", "dev/pts"):
            target = root / name
            target.mkdir(parents=True, exist_ok=True)
            runner.note("mount", target=str(target.resolve()))
            if name == "proc":
                runner.run(["mount", "-t", "proc", "proc", target], step=step)
            else:
                runner.run(["mount", "--bind", f"/{name}", target], step=step)
            stack.callback(
                runner.run, ["umount", "--lazy", target], step=f"{step} (unmount {name})", check=False
            )
        stack.enter_context(_host_resolv_conf(root))
        stack.enter_context(_temporary_file(root / "usr/sbin/policy-rc.d", POLICY_RC_D, 0o755))
        if (root / "etc/dpkg").is_dir():
            stack.enter_context(_temporary_file(root / DPKG_UNSAFE_IO, "force-unsafe-io\n", 0o644))
        if apt_cache is not None and (root / "etc/apt").is_dir():
            apt_cache = stack.enter_context(_private_archives(apt_cache))
            mount_point = root / APT_CACHE_MOUNT
            mount_point.mkdir(parents=True, exist_ok=True)
            stack.callback(_rmdir_quietly, mount_point)
            runner.note("mount", target=str(mount_point.resolve()))
            runner.run(["mount", "--bind", apt_cache, mount_point], step=step)
            stack.callback(
                runner.run, ["umount", "--lazy", mount_point], step=f"{step} (unmount apt cache)", check=False
            )
            stack.enter_context(
                _temporary_file(
                    root / APT_CACHE_CONF,
                    f'Dir::Cache::Archives "/{APT_CACHE_MOUNT}/";\nAPT::Keep-Downloaded-Packages "true";\n',
                    0o644,
                )
            )
        yield root


@contextlib.contextmanager
def _private_archives(shared: Path) -> Iterator[Path]:
    """This build's own apt archives folder, filled with hard links to the shared cache's packages and
    linked back on exit: apt locks its archives folder for a whole install, so builds of other images
    that shared one folder would wait for each other (and time out)."""
    shared.mkdir(parents=True, exist_ok=True)
    for stale in shared.parent.glob(f".{shared.name}.*"):
        if (
            stale.name.rsplit(".", 1)[-1].isdigit()
            and not Path(f"/proc/{stale.name.rsplit('.', 1)[-1]}").exists()
        ):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build
    private = shared.parent / f".{shared.name}.{os.getpid()}"
    shutil.rmtree(private, ignore_errors=True)
    (private / "partial").mkdir(parents=True)
    _link_debs(shared, private)
    try:
        yield private
    finally:
        _link_debs(private, shared)
        shutil.rmtree(private, ignore_errors=True)


def _link_debs(source: Path, target: Path) -> None:
    for deb in source.glob("*.deb"):
        if (target / deb.name).exists():
            continue
        try:
            os.link(deb, target / deb.name)
        except FileExistsError:
            pass  # another build put it there meanwhile
        except OSError:  # another filesystem
            shutil.copyfile(deb, target / deb.name)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def _temporary_file(path: Path, content: str, mode: int) -> Iterator[None]:
    if path.exists() or path.is_symlink():
        yield  # the image has its own; leave it alone
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    path.chmod(mode)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _host_resolv_conf(root: Path) -> Iterator[None]:
    """The host's resolver for apt; afterwards the image's own resolv.conf (file, symlink or none) comes
    back, unless a package installed during the run replaced the host's copy with its own (a symlink of
    systemd-resolved): then that one stays. The host's nameservers never stay in the image."""
    target, saved = root / "etc/resolv.conf", root / SAVED_RESOLV
    had_own = target.exists() or target.is_symlink()
    if had_own:
        os.replace(target, saved)
    try:
        shutil.copyfile("/etc/resolv.conf", target)
        yield
    finally:
        if target.is_symlink():  # a package's own (the host's copy is a regular file)
            saved.unlink(missing_ok=True)
        else:
            target.unlink(missing_ok=True)
            if had_own:
                os.replace(saved, target)
