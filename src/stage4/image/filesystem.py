"""Reading files of an image's root filesystem without booting or mounting it writable.

ext4 is read with debugfs at the partition's offset: no mount, no root. debugfs cannot read btrfs or
xfs; for those (and for whole-tree walks, `mount=True`) a read-only loop mount at the partition's offset
is used.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stage4.config import DEFAULT_IDENTIFIER
from stage4.errors import StepFailed
from stage4.image.partitions import PartitionInfo, partitions, raw_view, root_partition
from stage4.runner import Runner


class FilesystemReader:
    """Lists and copies files of one partition's filesystem."""

    def __init__(self, raw: Path, partition: PartitionInfo, runner: Runner, mount: bool = False):
        self.raw, self.partition, self.runner = raw, partition, runner
        self._mount: Path | None = None
        self._stack = contextlib.ExitStack()
        self._wants_mount = mount or partition.fs_type != "ext4"

    def __enter__(self) -> FilesystemReader:
        if self._wants_mount:
            self._mount = self._stack.enter_context(self._loop_mount())
        return self

    @property
    def mountpoint(self) -> Path:
        """Where the filesystem is mounted read-only (only with mount=True or for xfs and btrfs)."""
        if self._mount is None:
            raise StepFailed("read files", "the filesystem is not mounted")
        return self._mount

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def _debugfs_target(self) -> str:
        return f"{self.raw}?offset={self.partition.offset}"

    def list_dir(self, path: str) -> list[str]:
        if self._mount is not None:
            directory = self._mount / path.lstrip("/")
            return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        result = self.runner.run(
            ["debugfs", "-R", f"ls -p {path}", self._debugfs_target], step="read files", capture=True
        )
        # `ls -p` lines: /inode/mode/uid/gid/name/size/
        names = [line.split("/")[5] for line in result.stdout.splitlines() if line.count("/") >= 6]
        return sorted(name for name in names if name not in (".", ".."))

    def copy_out(self, path: str, dest: Path) -> None:
        if self._mount is not None:
            shutil.copyfile(self._mount / path.lstrip("/"), dest)
            return
        self.runner.run(["debugfs", "-R", f"dump {path} {dest}", self._debugfs_target], step="read files")
        if not dest.exists():
            raise StepFailed("read files", f"{path} is not in the image")

    @contextlib.contextmanager
    def _loop_mount(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="stage4-mnt-") as tmp:
            options = f"ro,loop,offset={self.partition.offset},sizelimit={self.partition.size}"
            if self.partition.fs_type in ("xfs", "ext4"):
                options += ",norecovery"  # nothing may be written, not even a journal replay
            self.runner.run(
                ["mount", "-t", self.partition.fs_type or "auto", "-o", options, self.raw, tmp],
                step="read files",
            )
            try:
                yield Path(tmp)
            finally:
                self.runner.run(["umount", tmp], step="read files (unmount)", check=False)


def boot_files(reader: FilesystemReader) -> dict[str, str]:
    """Kernel version -> initramfs file name ('' if none) found in /boot."""
    names = reader.list_dir("/boot")
    kernels = {}
    for name in names:
        if name.startswith("vmlinuz-"):
            version = name.removeprefix("vmlinuz-")
            initrd = next(
                (c for c in (f"initrd.img-{version}", f"initramfs-{version}.img") if c in names), ""
            )
            kernels[version] = initrd
    return kernels


def extract_boot_files(
    image: Path,
    dest: Path,
    runner: Runner,
    identifier: str = DEFAULT_IDENTIFIER,
    kernel_version: str | None = None,
) -> tuple[Path, Path]:
    """Copy the (newest, or the given) kernel and its initramfs out of the image into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        root = root_partition(parts, identifier)
        if root is None:
            raise StepFailed("extract kernel", f"{image} has no partition named {identifier!r}")
        with FilesystemReader(raw, root, runner) as reader:
            kernels = boot_files(reader)
            if not kernels:
                raise StepFailed("extract kernel", f"{image} has no kernel in /boot")
            version = kernel_version or sorted(kernels)[-1]
            if not kernels.get(version):
                raise StepFailed("extract kernel", f"{image} has no initramfs for kernel {version}")
            kernel, initrd = dest / f"vmlinuz-{version}", dest / f"initrd.img-{version}"
            reader.copy_out(f"/boot/vmlinuz-{version}", kernel)
            reader.copy_out(f"/boot/{kernels[version]}", initrd)
    return kernel, initrd
