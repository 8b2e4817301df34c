"""Debian: bootstrapped with mmdebstrap from deb.debian.org (or a configured mirror), or installed from
the netinst ISO by debian-installer with a preseed file (Packer)."""

from __future__ import annotations

from stage4.distributions.apt import PreseedInstaller

# BIOS: the netinst ISO boots isolinux; its `auto` label sets auto=true priority=critical. The hostname
# is needed on the command line because the network is configured before the preseed file is fetched.
_BIOS_BOOT = (
    "<esc><wait>",
    "auto preseed/url=%HTTP%/preseed.cfg locale=en_US.UTF-8 keymap=us"
    " netcfg/get_hostname=stage4 netcfg/get_domain=localdomain<enter>",
)
# UEFI: the ISO boots GRUB; load the installer kernel by hand from GRUB's command line.
_EFI_BOOT = (
    "c<wait>",
    "linux /install.amd/vmlinuz auto=true priority=critical preseed/url=%HTTP%/preseed.cfg"
    " locale=en_US.UTF-8 keymap=us netcfg/get_hostname=stage4 netcfg/get_domain=localdomain --- quiet<enter><wait>",
    "initrd /install.amd/initrd.gz<enter><wait>",
    "boot<enter>",
)


class Debian(PreseedInstaller):
    family = "debian"
    default_mirror = "http://deb.debian.org/debian"
    components = ("main",)
    kernel_package = "linux-image-amd64"
    extra_suites = ("updates",)
    boot_command = _BIOS_BOOT
    boot_command_efi = _EFI_BOOT

    @classmethod
    def security_sources(cls, mirror: str | None) -> list[str]:
        # A custom mirror is taken to carry what the site wants; the default gets the security archive.
        if mirror:
            return []
        return [f"deb http://security.debian.org/debian-security {cls.codename}-security main"]


class Debian12(Debian):
    name = "debian-12"
    release = "12"
    codename = "bookworm"
    pretty_name = "Debian 12 (bookworm)"
    # Debian's archive keeps every superseded point release under its own number for good (not
    # `latest-oldstable` or `current`, which move on at the next point release).
    iso_url = "https://cdimage.debian.org/cdimage/archive/12.14.0/amd64/iso-cd/debian-12.14.0-amd64-netinst.iso"
    iso_checksum = "file:https://cdimage.debian.org/cdimage/archive/12.14.0/amd64/iso-cd/SHA256SUMS"


class Debian13(Debian):
    name = "debian-13"
    release = "13"
    codename = "trixie"
    pretty_name = "Debian 13 (trixie)"
    iso_url = "https://cdimage.debian.org/cdimage/archive/13.5.0/amd64/iso-cd/debian-13.5.0-amd64-netinst.iso"
    iso_checksum = "file:https://cdimage.debian.org/cdimage/archive/13.5.0/amd64/iso-cd/SHA256SUMS"
