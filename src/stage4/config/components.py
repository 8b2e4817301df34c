"""Where the built parts come from and what the dev run makes of them: sources, components (dnbd3,
xloop by default), the initramfs and mltk modules."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stage4.config.fields import PackageName, Strict, missing_problem, relative_to_config


class SourceConfig(Strict):
    """Where a component or the initramfs module comes from: exactly one of git, tarball or path."""

    git: str | None = Field(None, description="git URL to clone")
    ref: str = Field("master", description="with git: branch, tag or commit to check out")
    tarball: str | None = Field(None, description="URL or file of a tarball (needs sha256)")
    sha256: str | None = Field(None, description="with tarball: its SHA-256; a mismatch stops the build")
    path: Path | None = Field(None, description="a local directory (relative to the project file)")

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        value = relative_to_config(value, info)
        if value is not None and not value.is_dir():
            raise PydanticCustomError("source", "{what}", {"what": missing_problem(value, "directory")})
        return value

    @field_validator("tarball")
    @classmethod
    def _local_tarball(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or "://" in value:
            return value
        path = relative_to_config(Path(value), info)
        if not path.is_file():
            raise PydanticCustomError("source", "{what}", {"what": missing_problem(path, "file")})
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


# The stage-3 dracut module shipped with stage4 (a tree with modules.d/), used when no source is given.
SHIPPED_STAGE3 = Path(__file__).parents[1] / "stage3"
# Its dracut module: the default of dracut_modules, and what export looks for in an initramfs it takes from
# an image's /boot (without it a client's initramfs cannot find its root).
SHIPPED_STAGE3_MODULE = "dnbd3-rootfs"


class InitramfsConfig(Strict):
    """[images.NAME.initramfs]: the initramfs built in the dev layer for the image's own kernel."""

    dracut_modules: tuple[str, ...] = Field((SHIPPED_STAGE3_MODULE,), description="dracut modules to add")
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
        description="modules to run (core/modules/NAME or core/targets/stage4/NAME) or targets, whose linked "
        "modules and sub-targets come in (core/targets/NAME, e.g. 'stage4'); their REQUIRED_MODULES come "
        "along, each before the modules that require it"
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
