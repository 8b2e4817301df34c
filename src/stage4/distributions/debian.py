"""Debian: bootstrapped with mmdebstrap from deb.debian.org (or a configured mirror)."""

from __future__ import annotations

from stage4.distributions.apt import AptDistribution


class Debian(AptDistribution):
    family = "debian"
    default_mirror = "http://deb.debian.org/debian"
    components = ("main",)
    kernel_package = "linux-image-amd64"
    extra_suites = ("updates",)

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


class Debian13(Debian):
    name = "debian-13"
    release = "13"
    codename = "trixie"
    pretty_name = "Debian 13 (trixie)"
