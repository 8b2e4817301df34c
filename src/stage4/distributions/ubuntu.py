"""Ubuntu: bootstrapped with mmdebstrap from archive.ubuntu.com (or a configured mirror)."""

from __future__ import annotations

from stage4.distributions.apt import AptDistribution


class Ubuntu(AptDistribution):
    family = "ubuntu"
    default_mirror = "http://archive.ubuntu.com/ubuntu"
    components = ("main", "universe")
    kernel_package = "linux-image-generic"
    extra_suites = ("updates", "security")


class Ubuntu2404(Ubuntu):
    name = "ubuntu-24.04"
    release = "24.04"
    codename = "noble"
    pretty_name = "Ubuntu 24.04 LTS (noble)"
