"""The project file's model: [machine], [build] and each [images.NAME] with its layers and desktop."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stage4 import distributions
from stage4.config.components import ComponentConfig, InitramfsConfig, MltkConfig, default_components
from stage4.config.fields import (
    DEFAULT_IDENTIFIER,
    DEFAULT_IMAGE,
    NAME_RE,
    QCOW2_MAX_SIZE,
    Accelerator,
    BuilderKind,
    Filesystem,
    PackageName,
    Playbook,
    Strict,
    Way,
    directory_problem,
    identifier_problem,
    parse_size,
)
from stage4.errors import MISSING, ConfigError


class MachineConfig(Strict):
    """[machine]: the VM settings every build shares (the role of base.json in the original design)."""

    cpus: int = Field(2, ge=1, le=256, description="virtual CPUs of every build and boot VM")
    memory: int = Field(2 << 30, description="memory of every VM, e.g. '2G'")
    disk_size: int = Field(4 << 30, description="virtual size of the image disk, e.g. '4G'")
    accelerator: Accelerator = Field(
        Accelerator.auto, description="'auto' probes KVM with a tiny guest and falls back to TCG"
    )

    @field_validator("memory", "disk_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int:
        return parse_size(value)

    @field_validator("memory")
    @classmethod
    def _memory_range(cls, value: int) -> int:
        if value < 256 << 20:
            raise PydanticCustomError("size", "at least 256M are needed to boot an image")
        return value

    @field_validator("disk_size")
    @classmethod
    def _disk_range(cls, value: int) -> int:
        if value < 1 << 30:
            raise PydanticCustomError("size", "at least 1G is needed for a base image")
        if value > QCOW2_MAX_SIZE:
            raise PydanticCustomError("size", "larger than the 2P a qcow2 image can hold")
        return value


class BuildPaths(Strict):
    """[build]: where results, work files and caches go."""

    output_dir: Path = Field(Path("output"), description="images, manifests and logs, one folder per image")
    cache_dir: Path = Field(
        Path("~/.cache/stage4"),
        description="package cache and accelerator probe results, kept between builds",
    )

    @field_validator("output_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        value = value.expanduser().absolute()
        if problem := directory_problem(value):
            raise PydanticCustomError("directory", problem)
        return value


class LayerConfig(Strict):
    """[images.NAME.dev] and [images.NAME.prod]: one provisioning layer on top of the base."""

    playbooks: tuple[Playbook, ...] = Field(
        (),
        description="Ansible playbooks run in this layer, in order "
        "(relative to the project file; target hosts: all; stage4's own plays gather no facts, so a "
        "playbook that needs them keeps its fact gathering on; every play is given "
        "stage4_package_manager and stage4_distribution_release)",
    )
    packages: tuple[PackageName, ...] = Field((), description="packages installed before the playbooks")
    vars: dict[str, Any] = Field(default_factory=dict, description="variables passed to the playbooks")
    way: Way = Field(
        Way.chroot,
        description="'chroot': attach the layer on the host (fast); "
        "'vm': boot it in qemu and provision over SSH (for tasks that need the image's kernel or init); "
        "'packer': the same run done by Packer's qemu builder (disk_image over the base) and its "
        "ansible provisioner",
    )


class Session(StrEnum):
    xfce = "xfce"
    gnome = "gnome"


class DesktopConfig(Strict):
    """[images.NAME.desktop]: a graphical session with its display manager, installed in the prod layer."""

    session: Session = Field(
        Session.xfce, description="'xfce' (with LightDM, as bwLehrpool uses) or 'gnome' (with GDM)"
    )
    browser: bool = Field(False, strict=True, description="also install a web browser (Firefox ESR)")


class ImageConfig(Strict):
    """[images.NAME]: one image to build."""

    distribution: str = Field(DEFAULT_IMAGE, description="one of `stage4 distributions`, e.g. 'debian-12'")
    builder: BuilderKind = Field(
        BuilderKind.bootstrap,
        description="'bootstrap' (mmdebstrap, no VM) or 'packer' (the installer ISO); "
        "default: bootstrap where the distribution allows it, else packer",
    )
    filesystem: Filesystem = Field(Filesystem.ext4, description="root filesystem: 'ext4', 'btrfs' or 'xfs'")
    identifier: str = Field(
        DEFAULT_IDENTIFIER,
        description="GPT partition name and filesystem label of the root partition "
        "(the clients' SLX_SYSTEM_PARTITION_IDENTIFIER)",
    )
    packages: tuple[PackageName, ...] = Field((), description="extra packages for the base (keep it small)")
    mirror: str | None = Field(None, description="package mirror URL; default: the distribution's own")
    iso: str | None = Field(
        None, description="with packer: installer ISO, a local path or URL; default: the catalog's"
    )
    iso_checksum: str | None = Field(
        None, description="with iso: 'sha256:<hex>', a bare digest, 'file:<URL>' or a local checksum file"
    )
    efi: bool = Field(False, strict=True, description="with packer: install for UEFI instead of BIOS")
    installer_timeout: str = Field(
        "60m", description="with packer: how long the installer may take, e.g. '60m'"
    )
    dev: LayerConfig | None = Field(
        None, description="the dev layer; giving dev or prod (even empty) builds both layers on the base"
    )
    prod: LayerConfig | None = Field(None, description="the prod layer (see dev)")
    desktop: DesktopConfig | None = Field(
        None, description="a graphical desktop in the prod layer (implies the layers); the base stays without"
    )
    initramfs: InitramfsConfig = Field(InitramfsConfig(), description="the initramfs built in the dev layer")
    components: dict[Annotated[str, Field(pattern=NAME_RE.pattern)], ComponentConfig] = Field(
        default_factory=default_components, description="components built in dev and installed in prod"
    )
    mltk: MltkConfig | None = Field(None, description="mltk modules built in dev and installed in prod")

    @property
    def layered(self) -> bool:
        return any(part is not None for part in (self.dev, self.prod, self.desktop, self.mltk))

    @field_validator("desktop")
    @classmethod
    def _desktop_needs_apt(cls, value: DesktopConfig | None, info: ValidationInfo) -> DesktopConfig | None:
        name = info.data.get("distribution")
        if (
            value is not None
            and name is not None
            and distributions.get(name).family not in ("debian", "ubuntu")
        ):
            raise PydanticCustomError(
                "desktop", "desktop images are built for Debian and Ubuntu only, not {dist}", {"dist": name}
            )
        return value

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, value: str) -> str:
        if value not in distributions.names():
            raise PydanticCustomError(
                "distribution",
                "unknown distribution; known: {known}",
                {"known": ", ".join(distributions.names())},
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_builder(cls, data: object) -> object:
        """Without a builder, a distribution that cannot be bootstrapped is installed with Packer."""
        if (
            isinstance(data, dict)
            and "builder" not in data
            and data.get("distribution") in distributions.names()
            and not distributions.get(data["distribution"]).bootstrappable
        ):
            return {**data, "builder": BuilderKind.packer.value}
        return data

    @field_validator("builder")
    @classmethod
    def _builder_fits_distribution(cls, value: BuilderKind, info: ValidationInfo) -> BuilderKind:
        name = info.data.get("distribution")
        if name is None:
            return value
        dist = distributions.get(name)
        if value is BuilderKind.bootstrap and not dist.bootstrappable:
            raise PydanticCustomError(
                "builder", "{dist} cannot be bootstrapped; use 'packer'", {"dist": name}
            )
        if value is BuilderKind.packer and not dist.has_installer():
            raise PydanticCustomError("builder", "{dist} has no installer in the catalog", {"dist": name})
        return value

    @field_validator("filesystem")
    @classmethod
    def _filesystem_fits_installer(cls, value: Filesystem, info: ValidationInfo) -> Filesystem:
        name, builder = info.data.get("distribution"), info.data.get("builder")
        if name is not None and builder is BuilderKind.packer:
            dist = distributions.get(name)
            if value.value not in dist.filesystems:
                raise PydanticCustomError(
                    "filesystem",
                    "the {dist} installer cannot create it; use one of {known}",
                    {"dist": name, "known": ", ".join(dist.filesystems)},
                )
        return value

    @field_validator("installer_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not re.match(r"^0*[1-9]\d*[smh]$", value):
            raise PydanticCustomError("duration", "expected a duration such as '90s', '60m' or '2h'")
        return value

    @field_validator("iso_checksum")
    @classmethod
    def _checksum_always(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() == "none":
            raise PydanticCustomError("iso_checksum", "ISO checksums are always verified; give the real one")
        return value

    @field_validator("identifier")
    @classmethod
    def _valid_identifier(cls, value: str, info: ValidationInfo) -> str:
        filesystem = info.data.get("filesystem")
        if problem := identifier_problem(value, None if filesystem is None else str(filesystem)):
            raise PydanticCustomError("identifier", problem)
        return value

    @field_validator("mirror")
    @classmethod
    def _mirror_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(https?|file)://\S+$", value):
            raise PydanticCustomError("mirror", "expected an http://, https:// or file:// URL")
        return value.rstrip("/") if value else value


ImageName = Annotated[str, Field(pattern=NAME_RE.pattern)]


class Config(Strict):
    """The whole project file."""

    machine: MachineConfig = MachineConfig()
    build: BuildPaths = BuildPaths()
    images: dict[ImageName, ImageConfig] = Field(
        default_factory=lambda: {DEFAULT_IMAGE: ImageConfig()}, description="the images to build"
    )
    source: str = Field("built-in defaults", exclude=True)

    @field_validator("images")
    @classmethod
    def _some_image(cls, value: dict[str, ImageConfig]) -> dict[str, ImageConfig]:
        if not value:
            raise PydanticCustomError("images", "no image defined; add an [images.NAME] table")
        return value

    def warnings(self) -> list[str]:
        """Valid but probably unintended settings, one line each."""
        return [
            f"{self.source}: images.{name}.components.{component}.artifacts: none given; the component is "
            "built in the dev layer but nothing of it is installed"
            for name, image in self.images.items()
            for component, settings in image.components.items()
            if not settings.artifacts
        ]

    def image(self, name: str) -> ImageConfig:
        try:
            return self.images[name]
        except KeyError:
            raise ConfigError(
                self.source, f"images.{name}", MISSING, f"no such image; defined: {', '.join(self.images)}"
            ) from None
