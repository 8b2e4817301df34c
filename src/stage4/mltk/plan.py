"""The host's part of running mltk modules: sources, module order, and what the layers' roles get.

Dev: the mltk checkout is fetched like a component's source (git + ref, tarball + sha256 or a folder,
through stage4's source cache), the configured modules and their REQUIRED_MODULES are read and ordered
(bad names and cycles stop the build here, before the layer is made), and each REQUIRED_GIT repository
is fetched on the host as well, so the layer needs no network and offline hosts can import them. After
the run each module's result, `mltk/NAME.tar` (the collected files and the module folder), is taken out
with the other artifacts. Prod installs from those files only.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NotRequired, TypedDict

from stage4.config import SourceConfig
from stage4.config.components import MltkConfig
from stage4.errors import ConfigError, StepFailed
from stage4.mltk.modules import Module, ModuleProblem, ordered, sys_versions
from stage4.mltk.packages import PackageIndex
from stage4.mltk.readiness import Checker, Readiness, defined_functions
from stage4.mltk.targets import sys_variables
from stage4.provisioning import sources
from stage4.provisioning.source_cache import SourceCache

if TYPE_CHECKING:
    from stage4.context import Context
    from stage4.runner import Runner

DRIVER = Path(__file__).parent / "driver.sh"
RESULTS = "mltk"  # below the layer's output folder and the image's artifacts folder
# What a module's result ships into /: its data/ folder and the files the dev run collected.
SHIPPED = ("module/data/", "files/")
# An enabling link (systemctl enable's, or one a module keeps in data/): the unit it enables.
ENABLED_UNIT = re.compile(r"(?:^|/)(?:etc|lib|usr/lib)/systemd/system/[^/]+\.(?:wants|requires)/([^/]+)$")
ASH_SHEBANG = re.compile(rb"^#![ \t]*/(?:usr/)?bin/ash(?:\s|$)")
# busybox provides ash (the scripts of several modules start with #!/bin/ash) and the applets below; the
# package is named so on Debian, Ubuntu and the rpm distributions.
BUSYBOX_PACKAGE = "busybox"
# A program below /opt/openslx/bin or /opt/openslx/sbin that a shipped file names: bwLehrpool's stage 3
# copies its busybox and applets there, so modules call them so (run-virt's /opt/openslx/sbin/udhcpd).
OPENSLX_PROGRAM = re.compile(rb"/opt/openslx/(s?bin/[A-Za-z0-9_.+-]+)")
OPENSLX_SHIPPED = re.compile(r"^(?:module/data|files)/opt/openslx/(s?bin/[^/]+)$")
SCANNED_MAX = 1 << 20  # names sit in units and scripts; a larger file is a program or data


class ModuleFolder(TypedDict):
    name: str
    path: str  # relative to the checkout's top
    init: bool  # module.build defines module_init
    keep_downloads: bool  # its post_copy downloads: the result carries what the layer served it


class Served(TypedDict):
    """A file or git tree from stage4's source cache for a module's downloads inside the layer."""

    module: str
    slot: str  # its folder below the module's downloads folder in the layer
    source: str  # the cached file, or the tarball of the git tree
    git: bool


class GitTarball(TypedDict):
    """A module's REQUIRED_GIT repository, fetched on the host."""

    module: str
    folder: str
    tarball: str


class SysFacts(TypedDict):
    """What the driver exports as SYS_DISTRIBUTION, SYS_VERSION and SYS_CODENAME (mltk's lsb_release)."""

    distribution: str
    version: str
    codename: str


class BuildPlan(TypedDict):
    """The dev role's `stage4_mltk` variable."""

    tarball: str  # the mltk checkout
    driver: str
    sys_versions: str  # space-separated
    sys: SysFacts
    modules: list[ModuleFolder]  # in dependency order
    build_packages: list[str]
    content_packages: list[str]
    git: list[GitTarball]
    served: list[Served]
    # per module with served downloads, its index: "file|git TAB URL TAB ref|- TAB SLOT/file|SLOT/tree" lines
    download_index: dict[str, str]


class Results(TypedDict):
    """The dev manifest's `mltk` entry."""

    modules: list[str]
    content_packages: list[str]
    sys_versions: str
    sys: SysFacts
    files: list[str]  # relative to the artifacts folder
    ash: bool  # a shipped file starts with #!/bin/ash: prod installs busybox and provides /bin/ash
    # bin/NAME or sbin/NAME below /opt/openslx that shipped files name and no module ships: prod links
    # busybox's applets there, as bwLehrpool's stage 3 provides them
    applets: NotRequired[list[str]]
    units: list[str]  # the systemd units the modules' enabling links enable (stage4's boots report them)


class InstalledModule(TypedDict):
    name: str
    tarball: str


class InstallVars(TypedDict):
    """The prod role's `stage4_mltk` variable (only `modules`, empty, without mltk)."""

    driver: NotRequired[str]
    sys_versions: NotRequired[str]
    sys: NotRequired[SysFacts]
    ash: NotRequired[bool]
    applets: NotRequired[list[str]]
    units: NotRequired[list[str]]
    modules: list[InstalledModule]


class Shipped(NamedTuple):
    """What one module's result ships into /, as prod must know it."""

    units: set[str]
    ash: bool
    named: set[str]  # bin/NAME, sbin/NAME below /opt/openslx that its files name
    provided: set[str]  # ... and that it ships


def git_source(entry: str) -> tuple[str, SourceConfig]:
    """A REQUIRED_GIT entry ('URL', 'URL|branch' or 'URL||commit') as its folder name and source."""
    url, _, rest = entry.partition("|")
    ref = rest.lstrip("|") or "HEAD"
    return url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"), SourceConfig(git=url, ref=ref)


def checkout(
    name: str, mltk: MltkConfig, sources_dir: Path, runner: Runner, step: str, cache_dir: Path
) -> tuple[Path, Path]:
    """The mltk checkout fetched (its tarball for the layer) and unpacked on the host to be read."""
    tarball = sources.fetch("stage4-mltk", mltk.source, sources_dir, runner, f"{step} (mltk)", cache_dir)
    tree = sources_dir / "stage4-mltk-read"
    shutil.rmtree(tree, ignore_errors=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(tree, filter="tar")
    return tarball, tree


def read_modules(
    source: str, name: str, mltk: MltkConfig, distro: str, tree: Path, runner: Runner, step: str
) -> tuple[list[Module], list[str], dict[str, str]]:
    """The configured modules (targets expanded) in order, the module.conf suffixes and the SYS_*
    variables; a bad name, target or cycle is a ConfigError on images.NAME.mltk.modules."""
    versions = sys_versions(distro)
    variables = sys_variables(distro, versions)
    try:
        order = ordered(tree, list(mltk.modules), versions, runner, step, variables)
    except ModuleProblem as exc:
        raise ConfigError(
            source, f"images.{name}.mltk.modules", list(mltk.modules), f"{exc} ({mltk.source.describe()})"
        ) from None
    return order, versions, variables


def check(
    name: str, order: list[Module], distro: str, tree: Path, cache_dir: Path, runner: Runner
) -> Readiness:
    """Whether each module can run here (readiness.py), before any layer; `distro` is the image's own
    distribution (its packages), which an [images.NAME.mltk] distro does not change."""
    checker = Checker(tree, DRIVER, PackageIndex.load(distro, cache_dir), cache_dir, runner)
    return checker.check(name, order, distro)


def prepare(ctx: Context, sources_dir: Path, step: str) -> BuildPlan:
    """Fetch the checkout and the modules' git sources; the dev role's `stage4_mltk` variable. A module
    that cannot run here stops the build, with the line `stage4 mltk plan` prints for it."""
    mltk, runner = ctx.image.mltk, ctx.runner
    if mltk is None:
        raise ValueError(f"image {ctx.name} has no mltk modules to prepare")
    tarball, tree = checkout(ctx.name, mltk, sources_dir, runner, step, ctx.cache_dir)
    distro = mltk.distro or ctx.image.distribution
    order, versions, variables = read_modules(ctx.source, ctx.name, mltk, distro, tree, runner, step)
    readiness = check(ctx.name, order, ctx.image.distribution, tree, ctx.cache_dir, runner)
    refused = readiness.not_ready
    if refused:
        more = (
            f" (and {len(refused) - 1} more: `stage4 mltk plan {ctx.name}` lists them)" if refused[1:] else ""
        )
        raise ConfigError(
            ctx.source, f"images.{ctx.name}.mltk.modules", list(mltk.modules), refused[0].line + more
        )
    git: list[GitTarball] = []
    for module in order:
        for entry in module.words("REQUIRED_GIT"):
            folder, source = git_source(entry)
            fetched = sources.fetch(
                f"mltk-{module.name}-{folder}",
                source,
                sources_dir,
                runner,
                f"{step} (mltk {module.name})",
                ctx.cache_dir,
            )
            git.append({"module": module.name, "folder": folder, "tarball": str(fetched)})
    served, index = _served(ctx, readiness, sources_dir, step)
    keep = {m.module.name for m in readiness.modules if m.post_copy_downloads and m.served}
    return {
        "tarball": str(tarball),
        "driver": str(DRIVER),
        "sys_versions": " ".join(versions),
        "sys": _sys(variables),
        "modules": [
            {
                "name": m.name,
                "path": m.path,
                "init": "module_init" in defined_functions(tree / m.path / "module.build"),
                "keep_downloads": m.name in keep,
            }
            for m in order
        ],
        "build_packages": _packages(order, "REQUIRED_INSTALLED_PACKAGES", "REQUIRED_CONTENT_PACKAGES"),
        "content_packages": _packages(order, "REQUIRED_CONTENT_PACKAGES"),
        "git": git,
        "served": served,
        "download_index": index,
    }


def _served(
    ctx: Context, readiness: Readiness, sources_dir: Path, step: str
) -> tuple[list[Served], dict[str, str]]:
    """What the modules' downloads inside the layer get from the source cache (downloads.py): each
    module's cached files and git trees, and the index the driver serves them by."""
    cache = SourceCache(ctx.cache_dir)
    served: list[Served] = []
    index: dict[str, str] = {}
    for report in readiness.modules:
        name, lines = report.module.name, []
        for number, entry in enumerate(report.served, 1):
            slot = str(number)
            if entry.kind == "git":
                source = sources.fetch(
                    f"mltk-{name}-download-{slot}",
                    # the commit the plan saw: no network lookup, and what the cache holds is what is served
                    SourceConfig(git=entry.url, ref=entry.commit or entry.ref),
                    sources_dir,
                    ctx.runner,
                    f"{step} (mltk {name})",
                    ctx.cache_dir,
                )
                lines.append(f"git\t{entry.url}\t{entry.ref}\t{slot}/tree")
            else:
                found = cache.tarball(entry.sha256 or "", ctx.runner)
                if found is None:
                    raise StepFailed(step, f"mltk module {name}: {entry.url} left stage4's source cache")
                source = found
                lines.append(f"file\t{entry.url}\t-\t{slot}/file")
            served.append({"module": name, "slot": slot, "source": str(source), "git": entry.kind == "git"})
        if lines:
            index[name] = "\n".join(lines) + "\n"
    return served, index


def _sys(variables: dict[str, str]) -> SysFacts:
    return {
        "distribution": variables["SYS_DISTRIBUTION"],
        "version": variables["SYS_VERSION"],
        "codename": variables["SYS_CODENAME"],
    }


def _packages(order: list[Module], *keys: str) -> list[str]:
    return sorted({p for module in order for key in keys for p in module.packages(key)})


def extract(out_dir: Path, staging: Path, plan: BuildPlan, step: str, log: Path | None) -> Results:
    """Copy each module's result out of the dev layer's output folder; the dev manifest's `mltk` entry."""
    (staging / RESULTS).mkdir(parents=True, exist_ok=True)
    files, units, ash, named, provided = [], set(), False, set(), set()
    for module in plan["modules"]:
        relative = f"{RESULTS}/{module['name']}.tar"
        if not (out_dir / relative).is_file():
            raise StepFailed(step, f"mltk module {module['name']} left no result ({relative})", log)
        shutil.copyfile(out_dir / relative, staging / relative)
        files.append(relative)
        found = shipped(staging / relative)
        units |= found.units
        ash = ash or found.ash
        named |= found.named
        provided |= found.provided
    return {
        "modules": [m["name"] for m in plan["modules"]],
        "content_packages": plan["content_packages"],
        "sys_versions": plan["sys_versions"],
        "sys": plan["sys"],
        "files": files,
        "ash": ash,
        "applets": sorted(named - provided),
        "units": sorted(units),
    }


def shipped(result: Path) -> Shipped:
    """What one module's result ships into /: the units its enabling links enable, whether a file starts
    with #!/bin/ash, and the /opt/openslx programs its files name and ship (decided here, from the files,
    so that prod need not guess)."""
    units: set[str] = set()
    named: set[str] = set()
    provided: set[str] = set()
    ash = False
    with tarfile.open(result) as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if not name.startswith(SHIPPED):
                continue
            if program := OPENSLX_SHIPPED.match(name):
                provided.add(program[1])
            if unit := ENABLED_UNIT.search(name):
                units.add(unit[1])
            elif member.isfile() and member.size <= SCANNED_MAX and (handle := archive.extractfile(member)):
                text = handle.read()
                ash = ash or bool(ASH_SHEBANG.match(text))
                named.update(m.decode() for m in OPENSLX_PROGRAM.findall(text))
    return Shipped(units, ash, named, provided)


def runtime_packages(mltk: Results) -> list[str]:
    """The packages prod installs for what the modules' files need at boot, besides their content
    packages."""
    return [BUSYBOX_PACKAGE] if mltk["ash"] or mltk.get("applets") else []


def install_vars(mltk: Results | None, artifacts_dir: Path) -> InstallVars:
    """The prod role's `stage4_mltk` variable, from the dev manifest's `mltk` entry."""
    if not mltk:
        return {"modules": []}
    return {
        "driver": str(DRIVER),
        "sys_versions": mltk["sys_versions"],
        "sys": mltk["sys"],
        "ash": mltk["ash"],
        "applets": mltk.get("applets", []),
        "units": mltk["units"],
        "modules": [
            {"name": name, "tarball": str(artifacts_dir / RESULTS / f"{name}.tar")}
            for name in mltk["modules"]
        ],
    }
