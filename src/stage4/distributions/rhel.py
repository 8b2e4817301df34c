"""CentOS 7, Rocky Linux and AlmaLinux 8/9: installed from an ISO by anaconda with a kickstart file.

Kickstart has no option for a GPT partition name (`part --label` is the filesystem label only), so
%pre lays out the disk with parted and names the root partition, and the `part` commands reuse the
partitions with --onpart (anaconda formats them and keeps their names); %post re-applies the name
if the partition lost it. `inst.gpt` (needed by CentOS 7 on disks under 2 TB) is always passed.
"""

from __future__ import annotations

from typing import ClassVar

from stage4.distributions.base import Distribution
from stage4.distributions.installer import FILESYSTEM_TOOLS, AnswerContext, render, unique

_BIOS_BOOT = ("<up><tab> inst.text inst.gpt inst.ks=%HTTP%/ks.cfg<enter><wait>",)
# GRUB on UEFI: select "Install", edit the entry, append to its linux line, boot with Ctrl-X.
_EFI_BOOT = (
    "<wait><up><wait>e<wait><down><wait><down><wait><end><wait>",
    " inst.text inst.gpt inst.ks=%HTTP%/ks.cfg<leftCtrlOn>x<leftCtrlOff>",
)


class Kickstart(Distribution):
    package_manager = "dnf"
    installer = "kickstart"
    answer_template = "kickstart.cfg.j2"
    boot_command = _BIOS_BOOT
    boot_command_efi = _EFI_BOOT
    boot_wait = "5s"
    # btrfs is not supported by the EL 8/9 installers (and only as a technology preview by EL 7's).
    filesystems = ("ext4", "xfs")
    # pykickstart syntax version (`ksvalidator -v`).
    kickstart_version: ClassVar[str] = ""
    environment_group: ClassVar[str] = "@^minimal-environment"
    # Minimal ISOs may lack python3 (EL 7) or carry it in a module stream (EL 8); Ansible then uses
    # the system's own python (python2 on EL 7, platform-python on EL 8).
    ignore_missing: ClassVar[bool] = False

    @classmethod
    def answer_files(cls, context: AnswerContext) -> dict[str, str]:
        cls.check_filesystem(context.filesystem)
        packages = unique(
            [
                "openssh-server",
                "sudo",
                "python3",
                "parted",
                FILESYSTEM_TOOLS[context.filesystem],
                *context.packages,
            ]
        )
        return {"ks.cfg": render(cls.answer_template, dist=cls, ctx=context, packages=packages)}


class CentOS(Kickstart):
    family = "centos"


class CentOS7(CentOS):
    name = "centos-7"
    release = "7"
    package_manager = "yum"
    pretty_name = "CentOS 7.9 (2009, end of life)"
    kickstart_version = "RHEL7"
    environment_group = "@^minimal"
    ignore_missing = True
    iso_url = "https://vault.centos.org/7.9.2009/isos/x86_64/CentOS-7-x86_64-Minimal-2009.iso"
    iso_checksum = "file:https://vault.centos.org/7.9.2009/isos/x86_64/sha256sum.txt"


class Rocky(Kickstart):
    family = "rocky"


class Rocky8(Rocky):
    name = "rocky-8"
    release = "8"
    pretty_name = "Rocky Linux 8.10"
    kickstart_version = "RHEL8"
    ignore_missing = True
    # 8.10 is the last 8.x: its own directory stays until the end of life, then moves to the vault
    # (dl.rockylinux.org/vault/rocky/8.10/isos/x86_64/).
    iso_url = "https://download.rockylinux.org/pub/rocky/8.10/isos/x86_64/Rocky-8.10-x86_64-minimal.iso"
    iso_checksum = "file:https://download.rockylinux.org/pub/rocky/8.10/isos/x86_64/CHECKSUM"


class Rocky9(Rocky):
    name = "rocky-9"
    release = "9"
    pretty_name = "Rocky Linux 9.8"
    kickstart_version = "RHEL9"
    # The 9.8 directory, not `9/` (a link that moves to 9.9); at 9.9 it moves to the vault,
    # dl.rockylinux.org/vault/rocky/9.8/isos/x86_64/ (set `iso` and `iso_checksum` to that then).
    iso_url = "https://download.rockylinux.org/pub/rocky/9.8/isos/x86_64/Rocky-9.8-x86_64-minimal.iso"
    iso_checksum = "file:https://download.rockylinux.org/pub/rocky/9.8/isos/x86_64/CHECKSUM"


class Alma(Kickstart):
    family = "alma"


class Alma8(Alma):
    name = "alma-8"
    release = "8"
    pretty_name = "AlmaLinux 8.10"
    kickstart_version = "RHEL8"
    ignore_missing = True
    # 8.10 is the last 8.x: its own directory stays until the end of life, then moves to the vault
    # (repo.almalinux.org/vault/8.10/isos/x86_64/).
    iso_url = "https://repo.almalinux.org/almalinux/8.10/isos/x86_64/AlmaLinux-8.10-x86_64-minimal.iso"
    iso_checksum = "file:https://repo.almalinux.org/almalinux/8.10/isos/x86_64/CHECKSUM"


class Alma9(Alma):
    name = "alma-9"
    release = "9"
    pretty_name = "AlmaLinux 9.8"
    kickstart_version = "RHEL9"
    # The 9.8 directory, not `9/` (a link that moves to 9.9); at 9.9 it moves to the vault,
    # repo.almalinux.org/vault/9.8/isos/x86_64/ (set `iso` and `iso_checksum` to that then).
    iso_url = "https://repo.almalinux.org/almalinux/9.8/isos/x86_64/AlmaLinux-9.8-x86_64-minimal.iso"
    iso_checksum = "file:https://repo.almalinux.org/almalinux/9.8/isos/x86_64/CHECKSUM"
