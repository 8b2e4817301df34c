"""mltk targets (core/targets/NAME: folders of links) expanded into their modules, and the SYS_* variables.

What mltk's setup_target does with a target, written for stage4: each link in the target folder (in name
order, only links count) is a module when the folder it points to has a module.conf, and is then known by
the link's name (so `kernel -> ../../modules/kernel-vanilla` makes the module `kernel` be kernel-vanilla,
also for every REQUIRED_MODULES that names `kernel`); a link to another target folder brings that
sub-target's links in, recursively; any other link is an error, and so is one name linked to two
different folders. mltk builds a whole target in the order of a bash associative array (its hash order,
which carries no meaning) with each module's REQUIRED_MODULES before it; stage4 keeps the order in which
the links are found (sub-targets where their link sits), with the same rule for REQUIRED_MODULES.

A configured name is a module when core/modules/NAME (or the stage4 target's link NAME) is one, else a
target when core/targets/NAME is a folder; mltk's `debug` and `qemu` are both, and mean the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stage4 import distributions
from stage4.distributions.apt import AptDistribution
from stage4.errors import InputError

TARGETS = "core/targets"


class TargetProblem(Exception):
    """A target cannot be expanded (a link that is neither module nor target, a name linked twice)."""


@dataclass
class Expansion:
    """The modules the configured names stand for: names in order, and the folders links give them."""

    names: list[str] = field(default_factory=list)
    links: dict[str, Path] = field(default_factory=dict)  # module name -> its folder (resolved)
    linked_by: dict[str, str] = field(default_factory=dict)  # module name -> the target that links it


def is_target(tree: Path, name: str) -> bool:
    folder = tree / TARGETS / name
    return folder.is_dir() and not (folder / "module.conf").exists()


def scan(tree: Path, target: str, into: Expansion) -> None:
    """Add the modules target `target` (a folder name below core/targets) links, sub-targets included."""
    targets = (tree / TARGETS).resolve()
    _scan(targets / target, targets, tree.resolve(), into)


def _scan(folder: Path, targets: Path, top: Path, into: Expansion) -> None:
    where = folder.relative_to(top)
    for item in sorted(folder.iterdir(), key=lambda p: p.name.encode()):
        if not item.is_symlink():
            continue
        real = item.resolve()
        if not real.is_relative_to(top):
            raise TargetProblem(f"{where}/{item.name} links outside the mltk checkout ({real})")
        if (item / "module.conf").is_file():
            known = into.links.get(item.name)
            if known is not None and known != real:
                raise TargetProblem(
                    f"{item.name} is linked to two different modules: {known.relative_to(top)} "
                    f"(by {into.linked_by[item.name]}) and {real.relative_to(top)} (by {where})"
                )
            if known is None:
                into.links[item.name] = real
                into.linked_by[item.name] = str(where)
                into.names.append(item.name)
        elif real.is_dir() and real.is_relative_to(targets):
            _scan(real, targets, top, into)
        else:
            raise TargetProblem(
                f"{where}/{item.name} links to {real.relative_to(top)}, which is neither a module "
                "(no module.conf) nor a target"
            )


def sys_variables(distro: str, versions: list[str]) -> dict[str, str]:
    """The SYS_* (and packet manager) variables mltk sets from `lsb_release`, for release `distro`
    (a catalog name such as 'debian-12'; another name gives its family and version, and no codename).

    mltk computes these on the build host, which is the image's distribution; stage4 reads module.conf on
    its own host, so they come from the catalog: SYS_DISTRIBUTION (lsb_release's id, lower case),
    SYS_VERSION (its release), SYS_CODENAME, SYS_VERSIONS (the module.conf suffixes, most specific first),
    PACKET_MANAGER / PACKET_HANDLER, and the amd64 facts module.conf files use (X86_64_I386,
    PLATFORM_DPKG, LIB64, ARCH_TRIPLET, ARCH_LIB_DIR).
    """
    family, _, version = distro.partition("-")
    codename = ""
    try:
        release = distributions.get(distro)
    except InputError:
        release = None
    if release is not None:
        family, version = release.family, release.release
        if issubclass(release, AptDistribution):
            codename = release.codename
    apt = family in ("debian", "ubuntu")
    packet = {"opensuse": ("zypper", "rpm")}.get(family, ("apt", "dpkg") if apt else ("yum", "rpm"))
    return {
        "SYS_DISTRIBUTION": family,
        "SYS_VERSION": version,
        "SYS_CODENAME": codename,
        "SYS_VERSIONS": " ".join(versions),
        "PACKET_MANAGER": packet[0],
        "PACKET_HANDLER": packet[1],
        "X86_64_I386": "x86_64",
        "PLATFORM_DPKG": "amd64",
        "LIB64": "lib" if apt else "lib64",
        "ARCH_TRIPLET": "x86_64-linux-gnu" if apt else "",
        "ARCH_LIB_DIR": "/lib/x86_64-linux-gnu" if apt else "/lib64",
    }
