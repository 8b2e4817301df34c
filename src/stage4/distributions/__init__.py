"""The distribution catalog: one small module per family, one class per release.

A release registers itself by subclassing its family with a `name` (see debian.py). The bootstrap
builder asks a release for its mirror, suite and packages; installer-driven builders ask it for its
answer file and boot command. Adding a distribution means adding a module and importing it below.
"""

from __future__ import annotations

from typing import ClassVar

from stage4.errors import InputError

_REGISTRY: dict[str, type[Distribution]] = {}


class Distribution:
    """A distribution release. Subclasses with a `name` are registered in the catalog."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    release: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    # Only apt-based releases can be bootstrapped with mmdebstrap; the others need an installer (Packer).
    bootstrappable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Distribution]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown distribution {name!r}; known: {', '.join(names())}") from None


# Importing a family module registers its releases.
from stage4.distributions import debian, ubuntu  # noqa: E402,F401
