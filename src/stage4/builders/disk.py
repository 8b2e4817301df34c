"""The GPT disk of a base image, assembled in a plain file: no loop device, no partition parser.

Layout (512-byte sectors, 1 MiB aligned):
  1  bios_grub   1 MiB   GRUB's core.img for BIOS boot (written by grub.py)
  2  ESP        64 MiB   FAT, GRUB for UEFI boot
  3  <identifier>  rest  the root filesystem; GPT name and filesystem label both = identifier
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stage4.errors import StepFailed
from stage4.runner import Runner

SECTOR = 512
MIB = 1 << 20
ALIGN = MIB // SECTOR
GPT_BACKUP_SECTORS = 33  # backup header + 32 sectors of partition entries at the end of the disk

BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # Discoverable Partitions: root (x86-64)


@dataclass(frozen=True)
class PartitionPlan:
    number: int
    name: str
    type_guid: str
    start: int  # sectors
    size: int  # sectors

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def bytes(self) -> int:
        return self.size * SECTOR


@dataclass(frozen=True)
class DiskLayout:
    disk_bytes: int
    bios_boot: PartitionPlan
    esp: PartitionPlan
    root: PartitionPlan

    @classmethod
    def plan(cls, disk_bytes: int, identifier: str) -> DiskLayout:
        sectors = disk_bytes // SECTOR
        bios = PartitionPlan(1, "bios_grub", BIOS_BOOT_TYPE, ALIGN, ALIGN)
        esp = PartitionPlan(2, "ESP", ESP_TYPE, 2 * ALIGN, 64 * ALIGN)
        root_start = esp.start + esp.size
        root_end = (sectors - GPT_BACKUP_SECTORS) // ALIGN * ALIGN
        root = PartitionPlan(3, identifier, ROOT_X86_64_TYPE, root_start, root_end - root_start)
        return cls(disk_bytes, bios, esp, root)

    def sfdisk_script(self) -> str:
        lines = ["label: gpt", "unit: sectors"]
        for part in (self.bios_boot, self.esp, self.root):
            lines.append(f'start={part.start}, size={part.size}, type={part.type_guid}, name="{part.name}"')
        return "\n".join(lines) + "\n"


def create_disk(layout: DiskLayout, path: Path, runner: Runner) -> None:
    with path.open("wb") as handle:
        handle.truncate(layout.disk_bytes)
    runner.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", path],
        step="partition table",
        input=layout.sfdisk_script().encode(),
    )


def write_root_filesystem(
    layout: DiskLayout, disk: Path, rootfs: Path, filesystem: str, work: Path, runner: Runner
) -> None:
    """Create the root filesystem with the identifier as its label and fill it from `rootfs`."""
    part, label = layout.root, layout.root.name
    step = f"{filesystem} root filesystem"
    if filesystem == "ext4":
        # Straight into the partition; the explicit size keeps mke2fs off the backup GPT.
        runner.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                label,
                "-d",
                rootfs,
                "-E",
                f"offset={part.offset}",
                disk,
                f"{part.bytes // 1024}k",
            ],
            step=step,
        )
        return
    image = work / "root.fs"
    with image.open("wb") as handle:
        handle.truncate(part.bytes)
    try:
        if filesystem == "btrfs":
            runner.run(["mkfs.btrfs", "-q", "-f", "-L", label, "--rootdir", rootfs, image], step=step)
        elif filesystem == "xfs":
            runner.run(["mkfs.xfs", "-q", "-f", "-L", label, image], step=step)
            _fill_by_loop_mount(image, rootfs, work, runner, step)
        else:
            raise StepFailed(step, f"unsupported filesystem {filesystem}")
        _copy_into(image, disk, part.offset, runner, step)
    finally:
        image.unlink(missing_ok=True)


def _fill_by_loop_mount(image: Path, rootfs: Path, work: Path, runner: Runner, step: str) -> None:
    # mkfs.xfs 6.1 cannot populate from a directory; a loop mount of the lone filesystem file can.
    mount_point = Path(tempfile.mkdtemp(prefix="mnt-", dir=work))
    try:
        runner.run(["mount", "-o", "loop", image, mount_point], step=step)
        try:
            runner.run(["cp", "-a", "--sparse=always", f"{rootfs}/.", mount_point], step=step)
        finally:
            runner.run(["umount", mount_point], step=f"{step} (unmount)", check=False)
    finally:
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def write_esp(layout: DiskLayout, disk: Path, efi_binary: Path, work: Path, runner: Runner) -> None:
    """A FAT EFI system partition holding GRUB as the removable-media default loader."""
    esp = work / "esp.fat"
    esp.unlink(missing_ok=True)
    try:
        runner.run(["mkfs.vfat", "-n", "EFI", "-C", esp, str(layout.esp.bytes // 1024)], step="EFI partition")
        env = {"MTOOLS_SKIP_CHECK": "1"}
        runner.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], step="EFI partition", env=env)
        runner.run(["mcopy", "-i", esp, efi_binary, "::/EFI/BOOT/BOOTX64.EFI"], step="EFI partition", env=env)
        _copy_into(esp, disk, layout.esp.offset, runner, "EFI partition")
    finally:
        esp.unlink(missing_ok=True)


def _copy_into(source: Path, disk: Path, offset: int, runner: Runner, step: str) -> None:
    runner.run(
        [
            "dd",
            f"if={source}",
            f"of={disk}",
            "bs=1M",
            f"seek={offset // MIB}",
            "conv=notrunc,sparse",
            "status=none",
        ],
        step=step,
    )
