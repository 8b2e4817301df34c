"""Ubuntu: bootstrapped with mmdebstrap from archive.ubuntu.com (or a configured mirror), or installed
from an ISO with Packer: 16.04 and 18.04 by debian-installer (preseed, the original design's Ubuntu
row), 22.04 and 24.04 by subiquity (autoinstall)."""

from __future__ import annotations

from typing import ClassVar

from stage4.distributions.apt import AptDistribution, PreseedInstaller
from stage4.distributions.installer import FILESYSTEM_TOOLS, AnswerContext, render, unique


class Ubuntu(AptDistribution):
    family = "ubuntu"
    default_mirror = "http://archive.ubuntu.com/ubuntu"
    components = ("main", "universe")
    kernel_package = "linux-image-generic"
    extra_suites = ("updates", "security")
    keyring = "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
    keyring_package = "ubuntu-keyring (from an Ubuntu system; Debian 12 does not package it)"


# --- debian-installer releases (the "server" ISOs, not live-server) --------------------------------

_DI_ARGS = (
    " auto=true priority=critical locale=en_US.UTF-8 keymap=us console-setup/ask_detect=false"
    " netcfg/get_hostname=stage4 netcfg/get_domain=localdomain preseed/url=%HTTP%/preseed.cfg"
)
# GRUB on UEFI: load the d-i kernel from GRUB's command line.
_DI_EFI_BOOT = (
    "c<wait>",
    "linux /install/vmlinuz" + _DI_ARGS + " ---<enter><wait>",
    "initrd /install/initrd.gz<enter><wait>",
    "boot<enter>",
)


class UbuntuPreseed(PreseedInstaller, Ubuntu):
    """16.04/18.04: d-i; the ISO's isolinux menu is left for the boot: line, which is then typed anew."""

    ssh_task = "openssh-server"
    # Installer-only here: the bootstrap builder's package set targets current releases.
    bootstrappable = False
    boot_command_efi = _DI_EFI_BOOT


class Ubuntu1604(UbuntuPreseed):
    name = "ubuntu-16.04"
    release = "16.04"
    codename = "xenial"
    pretty_name = "Ubuntu 16.04 LTS (xenial)"
    iso_url = "https://releases.ubuntu.com/16.04/ubuntu-16.04.7-server-amd64.iso"
    iso_checksum = "file:https://releases.ubuntu.com/16.04/SHA256SUMS"
    # Enter leaves the language menu, F6 + Esc opens the boot options line; clear it and type ours.
    boot_command = (
        "<enter><wait><f6><wait><esc><wait>",
        "<bs>" * 80,
        "/install/vmlinuz initrd=/install/initrd.gz" + _DI_ARGS + " ---<enter>",
    )


class Ubuntu1804(UbuntuPreseed):
    name = "ubuntu-18.04"
    release = "18.04"
    codename = "bionic"
    pretty_name = "Ubuntu 18.04 LTS (bionic)"
    iso_url = "https://cdimage.ubuntu.com/ubuntu/releases/18.04/release/ubuntu-18.04.6-server-amd64.iso"
    iso_checksum = "file:https://cdimage.ubuntu.com/ubuntu/releases/18.04/release/SHA256SUMS"
    # Esc twice leaves the gfxboot menus for isolinux's boot: prompt, Enter clears it.
    boot_command = (
        "<esc><wait><esc><wait><enter><wait>",
        "/install/vmlinuz initrd=/install/initrd.gz" + _DI_ARGS + " ---<enter>",
    )


# --- subiquity releases (live-server ISOs, GRUB on BIOS and UEFI) -----------------------------------


class UbuntuAutoinstall(Ubuntu):
    """22.04/24.04: subiquity reads `autoinstall` user-data from Packer's HTTP server (nocloud-net).

    curtin's storage config sets the filesystem label; the GPT name is set by a late command (curtin's
    `partition_name` works only with storage version 2 and subiquity >= 23.04.1, so it is added for
    releases that have it, and the late command makes it certain).
    """

    installer = "autoinstall"
    answer_template = "autoinstall-user-data.yml.j2"
    # The live installer runs its own sshd; Packer must not give up on it before the target is up.
    ssh_handshake_attempts = 200
    # Installer-only unless the bootstrap builder was checked against the release (24.04 was).
    bootstrappable = False
    curtin_partition_name: ClassVar[bool] = False
    # The install source (casper/install-sources.yaml) to pick, for subiquity versions that read a `source`
    # section; empty: leave the section out. subiquity's 22.04.x tags and its server/jammy branch have no
    # `source` in autoinstall-schema.json (the key would be ignored), and main between 2022-04-26 and
    # 2022-08-03 required `search_drivers` in it; without the section the user-data is valid for all of
    # them, and 22.04 installs the standard server source (tests/test_render.py checks the constraints).
    source_id: ClassVar[str] = ""

    @classmethod
    def answer_files(cls, context: AnswerContext) -> dict[str, str]:
        cls.check_filesystem(context.filesystem)
        packages = unique(["openssh-server", "sudo", "python3", FILESYSTEM_TOOLS[context.filesystem], *context.packages])
        name, part, disk = context.identifier, context.root_partition, context.disk
        late_commands = [
            f"sgdisk --change-name={part}:{name} {disk} || sfdisk --part-label {disk} {part} {name}",
            f"echo '{context.username} ALL=(ALL) NOPASSWD: ALL' > /target/etc/sudoers.d/stage4-build",
            "chmod 440 /target/etc/sudoers.d/stage4-build",
        ]
        user_data = render(
            cls.answer_template, dist=cls, ctx=context, packages=packages, late_commands=late_commands
        )
        return {"user-data": user_data, "meta-data": f"instance-id: stage4-{cls.name}\n"}


class Ubuntu2204(UbuntuAutoinstall):
    name = "ubuntu-22.04"
    release = "22.04"
    codename = "jammy"
    pretty_name = "Ubuntu 22.04 LTS (jammy)"
    # 22.04.5 is the last point release: its own directory, not `jammy/` (a link that follows the release).
    # After the end of standard support it moves to old-releases.ubuntu.com/releases/22.04.5/.
    iso_url = "https://releases.ubuntu.com/22.04.5/ubuntu-22.04.5-live-server-amd64.iso"
    iso_checksum = "file:https://releases.ubuntu.com/22.04.5/SHA256SUMS"
    # GRUB command line; ';' must be escaped for GRUB, and the nocloud-net URL must end with '/'.
    boot_command = (
        "<wait>c<wait>set gfxpayload=keep<enter><wait>",
        "linux /casper/vmlinuz quiet autoinstall ds=nocloud-net\\;s=%HTTP%/ ---<enter><wait>",
        "initrd /casper/initrd<enter><wait>",
        "boot<enter>",
    )
    boot_command_efi = boot_command


class Ubuntu2404(UbuntuAutoinstall):
    name = "ubuntu-24.04"
    release = "24.04"
    codename = "noble"
    pretty_name = "Ubuntu 24.04 LTS (noble)"
    bootstrappable = True
    curtin_partition_name = True
    source_id = "ubuntu-server-minimal"
    # Superseded by 24.04.5: Ubuntu keeps it in its archive of old point releases for good.
    iso_url = "https://old-releases.ubuntu.com/releases/24.04.4/ubuntu-24.04.4-live-server-amd64.iso"
    iso_checksum = "file:https://old-releases.ubuntu.com/releases/24.04.4/SHA256SUMS"
    # Edit the first GRUB entry: append to its linux line, boot with F10.
    boot_command = ("<wait>e<wait><down><down><down><end> autoinstall ds=nocloud-net\\;s=%HTTP%/<wait><f10>",)
    boot_command_efi = boot_command
