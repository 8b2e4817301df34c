"""What every distribution release answers: the base class of the families (debian.py, ubuntu.py, rhel.py).

This module imports none of them and not the package: the catalog in `stage4.distributions` is built from
the family modules, which import only this module, apt.py and installer.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from stage4.errors import InputError

if TYPE_CHECKING:
    from stage4.distributions.installer import AnswerContext


class Distribution:
    """A distribution release. Subclasses with a `name` are releases; the others are families."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    release: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    # Ansible's name of the release's package manager (its `pkg_mgr` fact), which stage4's roles are given
    # instead of gathering facts.
    package_manager: ClassVar[str] = ""
    # Only apt-based releases can be bootstrapped with mmdebstrap; the others need an installer (Packer).
    bootstrappable: ClassVar[bool] = False

    # Installer facts (Packer builder). `installer` is "preseed", "autoinstall" or "kickstart".
    installer: ClassVar[str] = ""
    # The installer ISO and how Packer verifies it: "file:<URL of a checksum file>" or "sha256:<hex>".
    iso_url: ClassVar[str] = ""
    iso_checksum: ClassVar[str] = ""
    # Keystrokes Packer types over VNC; "%HTTP%" stands for the URL of this release's answer files.
    boot_command: ClassVar[tuple[str, ...]] = ()
    boot_command_efi: ClassVar[tuple[str, ...]] = ()
    boot_wait: ClassVar[str] = "5s"
    # The Jinja2 template (in distributions/templates) of the answer file.
    answer_template: ClassVar[str] = ""
    # Root filesystems the installer can create with a label.
    filesystems: ClassVar[tuple[str, ...]] = ("ext4", "btrfs", "xfs")
    # SSH attempts Packer makes before giving up (live installers run an sshd of their own).
    ssh_handshake_attempts: ClassVar[int] = 20

    @classmethod
    def has_installer(cls) -> bool:
        return bool(cls.installer)

    @classmethod
    def template_name(cls) -> str:
        """The base name of the rendered Packer templates, e.g. 'ubuntu-16.04-amd64'."""
        return f"{cls.name}-amd64"

    @classmethod
    def answer_files(cls, context: AnswerContext) -> dict[str, str]:
        """The files Packer serves to the installer, by path below http/<name>/."""
        raise InputError(f"{cls.name} has no installer; build it with the bootstrap builder")

    @classmethod
    def boot_keys(cls, efi: bool, http_url: str) -> list[str]:
        """The boot command for this firmware, pointing the installer at `http_url` (no trailing slash)."""
        keys = cls.boot_command_efi if efi else cls.boot_command
        if not keys:
            raise InputError(f"{cls.name}: no {'UEFI' if efi else 'BIOS'} boot command is known")
        return [key.replace("%HTTP%", http_url) for key in keys]

    @classmethod
    def check_filesystem(cls, filesystem: str) -> None:
        if filesystem not in cls.filesystems:
            raise InputError(
                f"{cls.name}: its installer cannot create a {filesystem} root; "
                f"use one of {', '.join(cls.filesystems)}"
            )
