"""GRUB for BIOS and UEFI, installed into a disk image file without grub-install or a loop device.

grub-install and grub-bios-setup need a block device here (they probe the host's disks), so the BIOS
boot code is embedded the way grub-bios-setup does it: boot.img in the MBR pointing at core.img in the
bios_grub partition. UEFI gets a standalone GRUB EFI binary as EFI/BOOT/BOOTX64.EFI on the ESP.
Both find the root filesystem by its label and read /boot/grub/grub.cfg from it.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from stage4.builders.disk import SECTOR, DiskLayout
from stage4.errors import StepFailed
from stage4.runner import Runner

GRUB_LIB = Path("/usr/lib/grub")
MODULES = [
    "part_gpt",
    "ext2",
    "btrfs",
    "xfs",
    "search",
    "search_label",
    "normal",
    "configfile",
    "linux",
    "echo",
    "serial",
    "terminal",
    "test",
]
PLATFORM_MODULES = {"i386-pc": ["biosdisk"], "x86_64-efi": ["efi_gop", "all_video"]}

# Offsets in boot.img (GRUB's i386-pc boot sector) and in the first sector of core.img (diskboot).
KERNEL_SECTOR_AT = 0x5C
BOOT_DRIVE_AT = 0x64
DRIVE_CHECK_AT = 0x66
MBR_KEEP = slice(0x1B8, 0x1FE)  # disk signature and the protective MBR's partition table
BLOCKLIST_AT = SECTOR - 12
CORE_SEGMENT = 0x820


def early_config(identifier: str) -> str:
    return f"search --no-floppy --label {identifier} --set=root\nset prefix=($root)/boot/grub\n"


def grub_cfg(identifier: str, kernel_version: str, title: str) -> str:
    return f"""\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry '{title}' {{
    search --no-floppy --label {identifier} --set=root
    linux /boot/vmlinuz-{kernel_version} root=PARTLABEL={identifier} ro console=tty0 console=ttyS0,115200n8
    initrd /boot/initrd.img-{kernel_version}
}}
"""


def install_files(rootfs: Path, identifier: str, kernel_version: str, title: str) -> None:
    """GRUB's modules for both platforms and grub.cfg into the root filesystem's /boot/grub."""
    grub_dir = rootfs / "boot" / "grub"
    for platform in PLATFORM_MODULES:
        source = GRUB_LIB / platform
        if not source.is_dir():
            raise StepFailed("bootloader", f"{source} is missing (run ./install.sh)")
        target = grub_dir / platform
        target.mkdir(parents=True, exist_ok=True)
        for item in [*source.glob("*.mod"), *source.glob("*.lst")]:
            shutil.copy2(item, target / item.name)
    (grub_dir / "grub.cfg").write_text(grub_cfg(identifier, kernel_version, title), encoding="utf-8")


def make_image(platform: str, output: Path, identifier: str, work: Path, runner: Runner) -> None:
    early = work / f"early-{platform}.cfg"
    early.write_text(early_config(identifier), encoding="utf-8")
    runner.run(
        [
            "grub-mkimage",
            "-O",
            platform,
            "-o",
            output,
            "-c",
            early,
            "-p",
            "/boot/grub",
            *MODULES,
            *PLATFORM_MODULES[platform],
        ],
        step="bootloader",
    )


def embed_bios(layout: DiskLayout, disk: Path, work: Path, identifier: str, runner: Runner) -> None:
    """Write boot.img to the MBR and core.img into the bios_grub partition, as grub-bios-setup would."""
    core_path = work / "core.img"
    make_image("i386-pc", core_path, identifier, work, runner)
    core = bytearray(core_path.read_bytes())
    core += bytes(-len(core) % SECTOR)
    sectors = len(core) // SECTOR
    if len(core) > layout.bios_boot.bytes:
        raise StepFailed("bootloader", f"core.img ({len(core)} bytes) does not fit the bios_grub partition")
    # diskboot's block list: core.img's remaining sectors follow its first one, loaded at CORE_SEGMENT.
    struct.pack_into("<QHH", core, BLOCKLIST_AT, layout.bios_boot.start + 1, sectors - 1, CORE_SEGMENT)
    core[BLOCKLIST_AT - 12 : BLOCKLIST_AT] = bytes(12)
    boot = bytearray((GRUB_LIB / "i386-pc" / "boot.img").read_bytes())
    struct.pack_into("<Q", boot, KERNEL_SECTOR_AT, layout.bios_boot.start)
    boot[BOOT_DRIVE_AT] = 0xFF
    struct.pack_into("<H", boot, DRIVE_CHECK_AT, 0x9090)
    with disk.open("r+b") as handle:
        mbr = bytearray(handle.read(SECTOR))
        boot[MBR_KEEP] = mbr[MBR_KEEP]
        boot[0x1FE:0x200] = b"\x55\xaa"
        handle.seek(0)
        handle.write(boot)
        handle.seek(layout.bios_boot.offset)
        handle.write(core)
