"""The distribution catalog: one small module per family, one class per release.

A release is a subclass of its family with a `name` (see debian.py); the catalog below collects the
releases of the family modules, which import only base.py, apt.py and installer.py (never this package
module). The bootstrap builder asks a release for its mirror, suite and packages; installer-driven builders
ask it for its answer file and boot command. Adding a distribution means adding a module and listing it
in `_FAMILIES`.
"""

from __future__ import annotations

from types import ModuleType

from stage4.distributions import debian, rhel, ubuntu
from stage4.distributions.base import Distribution
from stage4.errors import InputError

__all__ = ["Distribution", "get", "installer_names", "names"]

_FAMILIES: tuple[ModuleType, ...] = (debian, ubuntu, rhel)


def _catalog(modules: tuple[ModuleType, ...]) -> dict[str, type[Distribution]]:
    found: dict[str, type[Distribution]] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Distribution) and value.name:
                found[value.name] = value
    return found


_CATALOG = _catalog(_FAMILIES)


def names() -> list[str]:
    return sorted(_CATALOG)


def get(name: str) -> type[Distribution]:
    try:
        return _CATALOG[name]
    except KeyError:
        raise InputError(f"unknown distribution {name!r}; known: {', '.join(names())}") from None


def installer_names() -> list[str]:
    """The releases that have an installer (and so can be built with Packer)."""
    return [name for name in names() if _CATALOG[name].installer]
