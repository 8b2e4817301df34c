"""Finding mltk modules in a checkout, reading their module.conf files and ordering them by dependency.

module.conf files are bash, so bash reads them (the general file, then the first distribution-specific
one that exists, as mltk does) and prints the REQUIRED_* variables; Python never parses bash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stage4.mltk.targets import TARGETS, Expansion, TargetProblem, is_target, scan
from stage4.runner import Runner

# Where a module is looked for in an mltk checkout: the module folders, then the Stage4 target's links.
MODULE_PLACES = ("core/modules", "core/targets/stage4")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")

# Sources module.conf and the first module.conf.<version> that exists; prints NAME\0VALUE\0 per variable.
# The SYS_* variables (targets.sys_variables) come as NAME=VALUE arguments before `--`.
READ_CONF = r"""
set -e
conf=$1
shift
while [ "$1" != -- ]; do
    declare -x "$1"
    shift
done
shift
. "$conf"
for version in "$@"; do
    if [ -e "$conf.$version" ]; then
        . "$conf.$version"
        printf 'STAGE4_CONF_FILE\0%s\0' "module.conf.$version"
        break
    fi
done
for name in ${!REQUIRED_*}; do
    printf '%s\0%s\0' "$name" "${!name}"
done
"""


class ModuleProblem(Exception):
    """A module cannot be used as configured (unknown, no module.conf, a dependency cycle)."""


@dataclass
class Module:
    name: str
    path: str  # relative to the checkout's top
    conf_file: str | None  # the distribution-specific module.conf.<version> read, if any
    required: dict[str, list[str]] = field(default_factory=dict)

    def words(self, key: str) -> list[str]:
        return self.required.get(key, [])

    @property
    def dependencies(self) -> list[str]:
        return self.words("REQUIRED_MODULES")

    def packages(self, key: str) -> list[str]:
        """A package list without the optional entries ('@name'), which mltk skips when installing."""
        return [p for p in self.words(key) if not p.startswith("@")]


def sys_versions(distro: str) -> list[str]:
    """The module.conf.<version> suffixes mltk tries, most specific first: 'ubuntu-22.04' ->
    ['ubuntu.22.04', 'ubuntu.22', 'ubuntu'] (mltk's names: lsb_release's id, the version split at '.')."""
    family, _, version = distro.partition("-")
    names, suffix = [family], family
    for part in (p for p in re.split(r"[._]", version.replace("-", "")) if p):
        suffix += f".{part}"
        names.insert(0, suffix)
    return names


def find(tree: Path, name: str, links: dict[str, Path] | None = None) -> Path:
    """The folder of module `name` in the checkout at `tree`: the one a configured target links under
    that name (`links`, which take precedence), else core/modules/NAME or the stage4 target's link."""
    top = tree.resolve()
    if links and name in links:
        return links[name]
    for place in MODULE_PLACES:
        candidate = (tree / place / name).resolve()
        if candidate.is_dir() and candidate.is_relative_to(top):
            if not (candidate / "module.conf").is_file():
                if place == MODULE_PLACES[1] and candidate.is_relative_to((tree / TARGETS).resolve()):
                    continue  # a sub-target linked by the stage4 target
                raise ModuleProblem(f"module {name!r} ({candidate.relative_to(top)}) has no module.conf")
            return candidate
    raise ModuleProblem(f"no module {name!r} in the mltk checkout (looked in {', '.join(MODULE_PLACES)})")


def expand(tree: Path, names: list[str]) -> Expansion:
    """The configured names with each target (core/targets/NAME) replaced by the modules it links."""
    expansion = Expansion()
    for name in names:
        try:
            find(tree, name)
        except ModuleProblem:
            if not is_target(tree, name):
                raise
            try:
                scan(tree, name, expansion)
            except TargetProblem as exc:
                raise ModuleProblem(f"target {name!r}: {exc}") from None
            continue
        if name not in expansion.names:
            expansion.names.append(name)
    return expansion


def read(
    tree: Path,
    name: str,
    versions: list[str],
    runner: Runner,
    step: str,
    links: dict[str, Path] | None = None,
    variables: dict[str, str] | None = None,
) -> Module:
    folder = find(tree, name, links)
    if not (folder / "module.build").is_file():
        raise ModuleProblem(f"module {name!r} has no module.build")
    out = runner.run(
        [
            "bash",
            "-c",
            READ_CONF,
            "read-conf",
            folder / "module.conf",
            *[f"{key}={value}" for key, value in (variables or {}).items()],
            "--",
            *versions,
        ],
        step=f"{step} (module.conf of {name})",
        capture=True,
        cwd=folder,
    ).stdout
    fields = out.split("\0")
    values = dict(zip(fields[0:-1:2], fields[1::2], strict=True))
    conf_file = values.pop("STAGE4_CONF_FILE", None)
    return Module(
        name,
        str(folder.relative_to(tree.resolve())),
        conf_file,
        {key: value.split() for key, value in values.items()},
    )


def ordered(
    tree: Path,
    names: list[str],
    versions: list[str],
    runner: Runner,
    step: str,
    variables: dict[str, str] | None = None,
) -> list[Module]:
    """The named modules (targets expanded) and their REQUIRED_MODULES, each after what it requires."""
    expansion = expand(tree, names)
    done: dict[str, Module] = {}
    visiting: list[str] = []

    def visit(name: str, wanted_by: str | None) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ModuleProblem(f"dependency cycle: {cycle}")
        try:
            module = read(tree, name, versions, runner, step, expansion.links, variables)
        except ModuleProblem as exc:
            raise ModuleProblem(
                f"{exc} (required by module {wanted_by!r})" if wanted_by else str(exc)
            ) from None
        visiting.append(name)
        for dependency in module.dependencies:
            visit(dependency, name)
        visiting.pop()
        done[name] = module

    for name in expansion.names:
        visit(name, None)
    return list(done.values())
