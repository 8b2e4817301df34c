"""What the apt-based families (Debian, Ubuntu) share: how mmdebstrap bootstraps them."""

from __future__ import annotations

from typing import ClassVar

from stage4.distributions import Distribution

# What every base holds: a kernel, an init, the initramfs generator, and what Ansible needs later.
BASE_PACKAGES = (
    "systemd-sysv",
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
    bootstrappable = True
    codename: ClassVar[str] = ""
    default_mirror: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ("main",)
    kernel_package: ClassVar[str] = ""
    # Suites beside the release itself, e.g. updates; security comes from its own mirror.
    extra_suites: ClassVar[tuple[str, ...]] = ()

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
