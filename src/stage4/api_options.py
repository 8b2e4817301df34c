"""The keyword options that stage4.api passes on unchanged, one TypedDict per function that takes them:
each mirrors the keyword parameters of the function that does the work (all optional there too)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from stage4.dnbd3.verify import Progress


class VerifyOptions(TypedDict, total=False):
    """`api.dnbd3_verify`: the keyword parameters of dnbd3.verify.verify."""

    store: Path | None
    published: Path | None
    sample: int | None
    identifier: str | None
    timeout: float
    progress: Progress | None
    seed: int | None


class RenderOptions(TypedDict, total=False):
    """`api.render`: the keyword parameters of builders.packer.targets_for (but its overrides)."""

    efi: bool | None
    iso: str | None
    iso_checksum: str | None
    ssh_timeout: str | None
