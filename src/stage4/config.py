"""The project file `stage4.toml`: one typed, validated model for the CLI, the builders and the docs.

Every field carries its description; `stage4 config --reference` renders them for the README, so the
documentation is generated from the same model that validates the file.
"""

from __future__ import annotations

import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticUndefined

from stage4 import distributions
from stage4.errors import MISSING, ConfigError

DEFAULT_CONFIG_FILE = "stage4.toml"
DEFAULT_IMAGE = "debian-12"

# Filesystem label limits in bytes (ext4: s_volume_name[16]; xfs: sb_fname[12]; btrfs: BTRFS_LABEL_SIZE-1).
LABEL_LIMITS = {"ext4": 16, "xfs": 12, "btrfs": 255}
# A GPT partition name is 36 UTF-16 code units; the identifier is ASCII, so 36 characters.
GPT_NAME_LIMIT = 36
# Conservative: the identifier ends up in kernel command lines, fstab, shell config and udev link names
# (/dev/disk/by-partlabel/ID, which systemd turns into a unit name); udev escapes none of these characters.
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# The largest virtual size of a qcow2 image with qemu-img's default 64 KiB clusters.
QCOW2_MAX_SIZE = 2 << 50


def parse_size(value: Any) -> int:
    """'4G', '512M', '2GiB' or a plain number of bytes; units are binary (as in qemu-img)."""
    if isinstance(value, bool):
        raise PydanticCustomError("size", "expected a size such as '4G' or '512M'")
    if isinstance(value, int):
        return value
    match = SIZE_RE.match(str(value))
    if not match:
        raise PydanticCustomError("size", "expected a size such as '4G' or '512M'")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """The shortest exact form parse_size reads back: 4294967296 -> '4G'."""
    for unit in ("P", "T", "G", "M", "K"):
        if size and size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return str(size)


def identifier_problem(value: str, filesystem: str | None = None) -> str | None:
    """Why `value` cannot be a root partition identifier, or None.

    It must suit every consumer: the GPT name, the filesystem label, udev's /dev/disk/by-partlabel/ link,
    systemd's unit name made from that path (fstab, root=PARTLABEL=) and the kernel command line.
    """
    if not value:
        return "must not be empty"
    if not value.isascii():
        return "must be ASCII (it is a GPT name and a filesystem label)"
    if not IDENTIFIER_RE.match(value):
        return "may contain only letters, digits, '_', '.' and '-' (no whitespace or '/')"
    if value in (".", ".."):
        return (
            "is not a name: /dev/disk/by-partlabel/.. is a directory, and systemd cannot make a unit name "
            "from that path (the image would not boot)"
        )
    if value.startswith("."):
        return "must not start with '.' (a hidden by-partlabel link that systemd escapes in unit names)"
    if value.startswith("-"):
        return "must not start with '-' (command-line tools would take it for an option)"
    if len(value) > GPT_NAME_LIMIT:
        return f"longer than the {GPT_NAME_LIMIT} characters of a GPT partition name"
    if filesystem is not None and len(value) > LABEL_LIMITS[filesystem]:
        return f"longer than the {LABEL_LIMITS[filesystem]} bytes of a {filesystem} label"
    return None


def _package_name(name: str) -> str:
    if not PACKAGE_RE.match(name):
        raise PydanticCustomError("package", "not a package name")
    return name


PackageName = Annotated[str, AfterValidator(_package_name)]


class Accelerator(StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class Filesystem(StrEnum):
    ext4 = "ext4"
    btrfs = "btrfs"
    xfs = "xfs"


class BuilderKind(StrEnum):
    bootstrap = "bootstrap"
    packer = "packer"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
    def _size(cls, value: Any) -> int:
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


def directory_problem(path: Path) -> str | None:
    """Why stage4 cannot make or use `path` as a directory (a file in the way), or None."""
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else f"{part} is a file, not a directory"
    return None


class Way(StrEnum):
    chroot = "chroot"
    vm = "vm"
    packer = "packer"


def _missing(path: Path, kind: str) -> str:
    """Why `path` is not the existing file or directory the config names."""
    if not path.exists():
        return f"no such {kind} {path}"
    return f"{path} is a {'file' if kind == 'directory' else 'directory'}, not a {kind}"


def _relative_to_config(value: Path | None, info: Any) -> Path | None:
    """Relative paths in the project file are relative to the file's directory."""
    if value is None:
        return None
    value = value.expanduser()
    base = (info.context or {}).get("base_dir") if info is not None else None
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _existing_playbook(value: Path, info: Any) -> Path:
    value = _relative_to_config(value, info)
    if not value.is_file():
        raise PydanticCustomError("playbook", "{what}", {"what": _missing(value, "file")})
    return value


Playbook = Annotated[Path, AfterValidator(_existing_playbook)]


class SourceConfig(Strict):
    """Where a component or the initramfs module comes from: exactly one of git, tarball or path."""

    git: str | None = Field(None, description="git URL to clone")
    ref: str = Field("master", description="with git: branch, tag or commit to check out")
    tarball: str | None = Field(None, description="URL or file of a tarball (needs sha256)")
    sha256: str | None = Field(None, description="with tarball: its SHA-256; a mismatch stops the build")
    path: Path | None = Field(None, description="a local directory (relative to the project file)")

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path | None, info: Any) -> Path | None:
        value = _relative_to_config(value, info)
        if value is not None and not value.is_dir():
            raise PydanticCustomError("source", "{what}", {"what": _missing(value, "directory")})
        return value

    @field_validator("tarball")
    @classmethod
    def _local_tarball(cls, value: str | None, info: Any) -> str | None:
        if value is None or "://" in value:
            return value
        path = _relative_to_config(Path(value), info)
        if not path.is_file():
            raise PydanticCustomError("source", "{what}", {"what": _missing(path, "file")})
        return str(path)

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[0-9a-fA-F]{64}$", value):
            raise PydanticCustomError("sha256", "expected 64 hexadecimal digits")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceConfig:
        given = [k for k in ("git", "tarball", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of git, tarball or path")
        if self.tarball is not None and self.sha256 is None:
            raise ValueError("a tarball needs its sha256")
        return self

    def describe(self) -> str:
        if self.git:
            return f"{self.git}@{self.ref}"
        return str(self.tarball or self.path)


class ArtifactConfig(Strict):
    """One file a component's build produces."""

    path: str = Field(description="the file, relative to the component's source directory after the build")
    kind: str = Field(
        "file",
        description="'module': a kernel module, installed into /lib/modules/KVER/extra with depmod; "
        "'file': installed at dest",
    )
    dest: str | None = Field(
        None, description="with kind 'file': absolute destination path in the prod image"
    )
    mode: str = Field("0644", description="with kind 'file': file mode")

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in ("module", "file"):
            raise PydanticCustomError("kind", "must be 'module' or 'file'")
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if not re.match(r"^0?[0-7]{3,4}$", value):
            raise PydanticCustomError("mode", "expected an octal file mode such as '0644' or '0755'")
        return value

    @model_validator(mode="after")
    def _dest(self) -> ArtifactConfig:
        if self.kind == "file" and not (self.dest or "").startswith("/"):
            raise ValueError("an artifact of kind 'file' needs an absolute dest")
        return self


class ComponentConfig(Strict):
    """[images.NAME.components.C]: something built in the dev layer and installed into prod."""

    source: SourceConfig = Field(description="where the sources come from")
    build: tuple[str, ...] = Field(
        (),
        description="shell commands run in the source directory in the dev layer; $KVER and $KDIR "
        "(the image kernel's version and build directory) are set",
    )
    artifacts: tuple[ArtifactConfig, ...] = Field((), description="files the build produces")
    build_packages: tuple[PackageName, ...] = Field(
        (), description="packages the build needs (dev layer only)"
    )
    runtime_packages: tuple[PackageName, ...] = Field(
        (), description="packages the artifacts need (installed in prod)"
    )


def default_components() -> dict[str, ComponentConfig]:
    """The dnbd3 and xloop kernel modules and the client tools the stage-3 initramfs needs.

    Release builds: a Debug xloop also builds its kernel tests (which need libcap) and logs every cached
    cluster. Each module lands in build/src/kernel/<module>/<module>.ko (upstream cmake/Kernel.cmake).
    """

    def module(name: str) -> ArtifactConfig:
        return ArtifactConfig(path=f"build/src/kernel/{name}/{name}.ko", kind="module")

    def tool(path: str) -> ArtifactConfig:
        return ArtifactConfig(path=path, dest=f"/usr/local/sbin/{Path(path).name}", mode="0755")

    configure = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKERNEL_BUILD_DIR=$KDIR"
    return {
        "dnbd3": ComponentConfig(
            source=SourceConfig(git="https://github.com/bwLehrpool/dnbd3.git", ref="master"),
            build=(
                f"{configure} -DDNBD3_KERNEL_MODULE=ON -DDNBD3_CLIENT_FUSE=OFF -DDNBD3_SERVER=OFF",
                "cmake --build build --parallel",
            ),
            artifacts=(module("dnbd3"), tool("build/src/client/dnbd3-client")),
            build_packages=("cmake", "git"),
        ),
        "xloop": ComponentConfig(
            source=SourceConfig(git="https://github.com/bwLehrpool/xloop.git", ref="master"),
            build=(configure, "cmake --build build --parallel"),
            artifacts=(
                module("xloop"),
                module("xloop_file_fmt_qcow"),
                module("xloop_file_fmt_raw"),
                tool("build/src/utils/sys-utils/xlosetup"),
            ),
            build_packages=("cmake", "git"),
        ),
    }


# The root partition's GPT name and filesystem label where nothing else is said (the OpenSLX convention).
DEFAULT_IDENTIFIER = "SLX_SYS"

# The stage-3 dracut module shipped with stage4 (a tree with modules.d/), used when no source is given.
SHIPPED_STAGE3 = Path(__file__).parent / "stage3"


class InitramfsConfig(Strict):
    """[images.NAME.initramfs]: the initramfs built in the dev layer for the image's own kernel."""

    dracut_modules: tuple[str, ...] = Field(("dnbd3-rootfs",), description="dracut modules to add")
    source: SourceConfig | None = Field(
        None,
        description="where the dracut modules come from: a tree with build-initramfs.sh (OpenSLX "
        "systemd-init) or one with modules.d/; default: the dnbd3-rootfs module shipped with stage4",
    )
    script_args: tuple[str, ...] = Field(
        ("--qcow-handler", "xloop"),
        description="extra arguments for build-initramfs.sh (if the source has it)",
    )

    @field_validator("dracut_modules")
    @classmethod
    def _module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
                raise PydanticCustomError("module", "'{name}' is not a dracut module name", {"name": name})
        return value

    @property
    def effective_source(self) -> SourceConfig:
        return self.source or SourceConfig(path=SHIPPED_STAGE3)


MLTK_MODULE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


class MltkConfig(Strict):
    """[images.NAME.mltk]: bwLehrpool mltk modules built in dev and installed in prod (see README)."""

    source: SourceConfig = Field(
        description="the mltk checkout (e.g. git = 'https://github.com/bwLehrpool/mltk.git')"
    )
    modules: tuple[str, ...] = Field(
        description="modules to run (core/modules/NAME or core/targets/stage4/NAME); their REQUIRED_MODULES "
        "come along, each before the modules that require it"
    )
    distro: str | None = Field(
        None,
        description="which module.conf.<distro> files apply, e.g. 'ubuntu-22.04' tries "
        "module.conf.ubuntu.22.04, .ubuntu.22, .ubuntu; default: the image's distribution",
    )

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise PydanticCustomError("modules", "name at least one module")
        for name in value:
            if not MLTK_MODULE_RE.match(name):
                raise PydanticCustomError("module", "'{name}' is not an mltk module name", {"name": name})
        return tuple(dict.fromkeys(value))

    @field_validator("distro")
    @classmethod
    def _distro(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-z]+(-[0-9][0-9A-Za-z._-]*)?$", value):
            raise PydanticCustomError("distro", "expected a name such as 'debian-12' or 'ubuntu-22.04'")
        return value


class LayerConfig(Strict):
    """[images.NAME.dev] and [images.NAME.prod]: one provisioning layer on top of the base."""

    playbooks: tuple[Playbook, ...] = Field(
        (),
        description="Ansible playbooks run in this layer, in order "
        "(relative to the project file; target hosts: all)",
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
    def _desktop_needs_apt(cls, value: DesktopConfig | None, info: Any) -> DesktopConfig | None:
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
    def _default_builder(cls, data: Any) -> Any:
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
    def _builder_fits_distribution(cls, value: BuilderKind, info: Any) -> BuilderKind:
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
    def _filesystem_fits_installer(cls, value: Filesystem, info: Any) -> Filesystem:
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
    def _valid_identifier(cls, value: str, info: Any) -> str:
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
    def _some_image(cls, value: dict) -> dict:
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


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _lookup(data: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return MISSING
    return data


# pydantic's messages for wrong TOML types, in the words of the file.
TYPE_MESSAGES = {
    "missing": "required key is missing",
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "path_type": "expected a path (a string)",
}


def _message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "enum":
        return "must be one of " + error["ctx"]["expected"].replace("'", "")
    if kind in TYPE_MESSAGES:
        return TYPE_MESSAGES[kind]
    if kind == "greater_than_equal":
        return f"must be at least {error['ctx']['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {error['ctx']['le']}"
    return error["msg"].removeprefix("Value error, ")


def from_dict(data: dict, source: str) -> Config:
    """Validate parsed TOML; the first problem becomes a ConfigError naming source, key and value."""
    try:
        return Config.model_validate(
            {**data, "source": source}, context={"base_dir": str(Path(source).absolute().parent)}
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error["loc"]
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            what = "component" if loc[-2] == "components" else "image"
            problem = (
                f"{what} name {loc[-1]!r} is not a simple name (a letter or digit, then letters, digits, "
                "'.', '_', '-'; at most 64 characters)"
            )
            raise ConfigError(source, _dotted(loc[:-1]), MISSING, problem) from None
        raise ConfigError(source, _dotted(loc), _lookup(data, loc), _message(error)) from None


def load(path: Path | None = None) -> Config:
    """Read a project file; without one, ./stage4.toml if it exists, else the built-in defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_FILE)
        if not candidate.exists():
            return Config()
        path = candidate
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "(file)", MISSING, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            str(path),
            "(file)",
            MISSING,
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} in line {line}); TOML files are UTF-8",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(file)", MISSING, f"not valid TOML: {exc}") from None
    return from_dict(data, str(path))


def reference() -> str:
    """Markdown reference of every config key, generated from the model."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]

    nested = {"dev", "prod", "desktop", "initramfs", "components", "source", "artifacts", "mltk"}

    def table(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            if field.exclude or name == "images" or name in nested and model is not ArtifactConfig:
                continue
            default = field.default
            shown = default.value if isinstance(default, StrEnum) else default
            if name in ("memory", "disk_size"):
                shown = f"{default >> 30}G"
            if name == "vars":
                shown = {}
            if shown is PydanticUndefined:
                shown = "(required)"
            lines.append(f"| `{prefix}.{name}` | `{shown!s}` | {field.description} |")

    table("machine", MachineConfig)
    table("build", BuildPaths)
    table("images.NAME", ImageConfig)
    table("images.NAME.dev", LayerConfig)
    table("images.NAME.prod", LayerConfig)
    table("images.NAME.desktop", DesktopConfig)
    table("images.NAME.initramfs", InitramfsConfig)
    lines.append(
        "| `images.NAME.initramfs.source` | the dnbd3-rootfs module shipped with stage4 | "
        + InitramfsConfig.model_fields["source"].description
        + " |"
    )
    table("images.NAME.initramfs.source", SourceConfig)
    lines.append(
        "| `images.NAME.components` | dnbd3, xloop (public repositories) | components built in dev and "
        "installed in prod; a table replaces the defaults |"
    )
    table("images.NAME.components.C", ComponentConfig)
    table("images.NAME.components.C.source", SourceConfig)
    table("images.NAME.components.C.artifacts[]", ArtifactConfig)
    lines.append(
        "| `images.NAME.mltk.source` | `(required)` | "
        + MltkConfig.model_fields["source"].description
        + "; giving [images.NAME.mltk] builds the dev and prod layers |"
    )
    table("images.NAME.mltk", MltkConfig)
    table("images.NAME.mltk.source", SourceConfig)
    return "\n".join(lines) + "\n"
