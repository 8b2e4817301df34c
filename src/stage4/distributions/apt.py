"""What the apt-based families (Debian, Ubuntu) share: how mmdebstrap bootstraps them, and d-i preseed."""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import urlsplit

from stage4.distributions.base import Distribution
from stage4.distributions.installer import FILESYSTEM_TOOLS as INSTALLER_FS_TOOLS
from stage4.distributions.installer import AnswerContext, render, unique

# What every base holds: a kernel, an init, the initramfs generator, and what Ansible needs later.
# systemd-networkd leaves /etc/resolv.conf alone; systemd-resolved takes the DHCP server's resolver
# (a VM provisioning run, a netbooted client). Its package links /etc/resolv.conf to its own stub.
BASE_PACKAGES = (
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "kmod",
    "dracut",
    "iproute2",
    "openssh-server",
    "python3",
    "sudo",
)
FILESYSTEM_TOOLS = {"ext4": "e2fsprogs", "btrfs": "btrfs-progs", "xfs": "xfsprogs"}


class AptDistribution(Distribution):
    package_manager = "apt"
    bootstrappable = True
    codename: ClassVar[str] = ""
    default_mirror: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ("main",)
    kernel_package: ClassVar[str] = ""
    # Suites beside the release itself, e.g. updates; security comes from its own mirror.
    extra_suites: ClassVar[tuple[str, ...]] = ()
    # The keyring that verifies the mirror, when the host's default (Debian's) does not.
    keyring: ClassVar[str | None] = None
    keyring_package: ClassVar[str] = ""

    @classmethod
    def packages(cls, filesystem: str) -> list[str]:
        return [cls.kernel_package, *BASE_PACKAGES, FILESYSTEM_TOOLS[filesystem]]

    @classmethod
    def sources(cls, mirror: str | None) -> list[str]:
        """One-line apt sources for mmdebstrap (each a full `deb URL SUITE COMPONENTS` line)."""
        url = mirror or cls.default_mirror
        components = " ".join(cls.components)
        lines = [f"deb {url} {cls.codename} {components}"]
        lines += [f"deb {url} {cls.codename}-{suite} {components}" for suite in cls.extra_suites]
        lines += cls.security_sources(mirror)
        return lines

    @classmethod
    def security_sources(cls, mirror: str | None) -> list[str]:
        return []

    @classmethod
    def release_file_url(cls, mirror: str | None) -> str:
        return f"{mirror or cls.default_mirror}/dists/{cls.codename}/InRelease"


class PreseedInstaller(AptDistribution):
    """Releases installed by debian-installer (d-i) driven by a preseed file (Debian, Ubuntu up to 18.04).

    partman has no key for a GPT partition name, so the recipe sets only the filesystem label and the
    late_command names the partition (sgdisk from gdisk, pulled in by pkgsel/include; sfdisk as fallback).
    """

    installer = "preseed"
    answer_template = "preseed.cfg.j2"
    # The tasksel task that installs the SSH server (Debian: ssh-server; Ubuntu: openssh-server).
    ssh_task: ClassVar[str] = "ssh-server"

    @classmethod
    def answer_files(cls, context: AnswerContext) -> dict[str, str]:
        cls.check_filesystem(context.filesystem)
        mirror = urlsplit(context.mirror or cls.default_mirror)
        packages = unique(
            [
                "openssh-server",
                "sudo",
                "python3",
                "gdisk",
                INSTALLER_FS_TOOLS[context.filesystem],
                *context.packages,
            ]
        )
        text = render(
            cls.answer_template,
            dist=cls,
            ctx=context,
            mirror_scheme=mirror.scheme,
            mirror_host=mirror.netloc,
            mirror_directory=mirror.path or "/",
            packages=packages,
        )
        return {"preseed.cfg": text}
