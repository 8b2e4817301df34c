"""Whether each mltk module can run here, decided on the host before any layer (`stage4 mltk plan`).

A module is not ready, with one reason (the first of these that applies), when it needs:
- a helper function mltk defines (core/includes, core/bin/setup_target) that stage4's driver lacks;
- a package the image's distribution lacks, by the distribution's package index (see PackageIndex);
- a REQUIRED_GIT repository that is neither in stage4's source cache nor reachable now;
- downloads inside the layer (module.build calling download, download_untar, wget, curl or git clone)
  with nothing in stage4's source cache under the URLs the module names (downloads.py);
- a REQUIRED_MODULES module that is not ready.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stage4.errors import StepFailed
from stage4.mltk import downloads
from stage4.mltk.modules import Module
from stage4.mltk.packages import PackageIndex
from stage4.provisioning.source_cache import FULL_COMMIT, GIT_ENV, PROBE_TIMEOUT, Entry, SourceCache
from stage4.runner import Runner

FUNCTION_RE = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(\)", re.MULTILINE)
HOOKS = {"fetch_source", "build", "post_copy", "pre_exec", "module_init"}
NOWHERE = "neither in the source cache nor reachable"


def _functions(text: str) -> set[str]:
    return set(FUNCTION_RE.findall(text))


def _code(path: Path) -> str:
    """module.build without its comment lines."""
    if not path.is_file():
        return ""
    return "\n".join(
        line for line in path.read_text(errors="replace").splitlines() if not line.lstrip().startswith("#")
    )


def defined_functions(build: Path) -> set[str]:
    """The functions a module.build defines (hooks and its own)."""
    return _functions(_code(build))


def lacking_helpers(tree: Path, driver: Path) -> set[str]:
    """The functions mltk gives modules (its core/includes and setup_target) that the driver does not."""
    mltk: set[str] = set()
    sources = [*sorted((tree / "core/includes").glob("**/*.inc")), tree / "core/bin/setup_target"]
    for path in sources:
        if path.is_file():
            mltk |= _functions(path.read_text(errors="replace"))
    return {name for name in mltk - _functions(driver.read_text()) - HOOKS if not name.startswith("_")}


def git_ref(entry: str) -> tuple[str, str]:
    """A REQUIRED_GIT entry ('URL', 'URL|branch' or 'URL||commit') as URL and ref."""
    url, _, rest = entry.partition("|")
    return url, rest.lstrip("|") or "HEAD"


@dataclass
class ModuleReport:
    order: int
    module: Module
    packages: list[str]
    downloads: list[str]
    reason: str | None = None
    served: list[Entry] = field(default_factory=list)  # what its downloads inside the layer get
    post_copy_downloads: bool = False  # post_copy (the prod layer) downloads too

    @property
    def line(self) -> str:
        """The one line naming the module and why it cannot run (the plan prints it, the build refuses
        with it)."""
        return f"mltk module {self.module.name}: not ready: {self.reason}"


@dataclass
class Readiness:
    image: str
    distro: str
    index: str  # where the package names came from, or why they were not checked
    modules: list[ModuleReport] = field(default_factory=list)

    @property
    def not_ready(self) -> list[ModuleReport]:
        return [m for m in self.modules if m.reason]

    @property
    def summary(self) -> str:
        return f"{len(self.modules) - len(self.not_ready)} of {len(self.modules)} modules ready"


class Checker:
    def __init__(self, tree: Path, driver: Path, index: PackageIndex, cache_dir: Path, runner: Runner):
        self.tree, self.index, self.runner = tree, index, runner
        self.lacking = lacking_helpers(tree, driver)
        self.cache = SourceCache(cache_dir)
        self.reachable: dict[str, bool] = {}

    def where(self, url: str, ref: str) -> str | None:
        """'in the source cache', or 'reachable' (a build then fetches and caches it), or None."""
        if self.cache.git_entry(url, ref):
            return "in the source cache"
        # A commit id is taken from any cached fetch of the URL, as a build does.
        if FULL_COMMIT.match(ref) and self.cache.has_commit(url, ref, self.runner, f"look up {url}"):
            return "in the source cache"
        if url not in self.reachable:
            try:
                self.runner.run(
                    ["git", "ls-remote", url, ref],
                    step=f"reach {url}",
                    env=GIT_ENV,
                    capture=True,
                    timeout=PROBE_TIMEOUT,
                )
                self.reachable[url] = True
            except StepFailed:
                self.reachable[url] = False
        return "reachable" if self.reachable[url] else None

    def check(self, image: str, order: list[Module], distro: str) -> Readiness:
        result = Readiness(image, distro, self.index.description)
        reasons: dict[str, str | None] = {}
        for number, module in enumerate(order, 1):
            packages = sorted(
                {
                    *module.packages("REQUIRED_INSTALLED_PACKAGES"),
                    *module.packages("REQUIRED_CONTENT_PACKAGES"),
                }
            )
            build = _code(self.tree / module.path / "module.build")
            found = downloads.calls(build, module)
            in_layer = sorted({call for call, _ in found})
            starts = downloads.beginnings(build, module) if in_layer else []
            served = downloads.cached(self.cache, starts)
            gits = module.words("REQUIRED_GIT")
            needs = [f"{entry} (REQUIRED_GIT, {self.where(*git_ref(entry)) or NOWHERE})" for entry in gits]
            for start in starts:
                under = downloads.pattern(start)
                count = sum(1 for entry in served if under.match(entry.url))
                needs.append(
                    f"{start}... (in the layer by {', '.join(in_layer)}: {count} in the source cache)"
                )
            if in_layer and not starts:
                needs.append(
                    f"module.build runs {', '.join(in_layer)} in the layer, from URLs it does not name"
                )
            download = _download_reason(in_layer, starts, served)
            reason = self._reason(module, build, packages, gits, download, reasons)
            reasons[module.name] = reason
            post_copy = any(function == "post_copy" for _, function in found)
            result.modules.append(ModuleReport(number, module, packages, needs, reason, served, post_copy))
        return result

    def _reason(
        self,
        module: Module,
        build: str,
        packages: list[str],
        gits: list[str],
        download: str | None,
        reasons: dict[str, str | None],
    ) -> str | None:
        own = _functions(build)
        used = sorted(
            name for name in self.lacking - own if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", build)
        )
        if used:
            return f"module.build calls {', '.join(used)}, which stage4's mltk driver lacks"
        missing = self.index.missing(packages)
        if missing:
            return f"{self.index.distro} has no package {', '.join(missing)} ({self.index.description})"
        for entry in gits:
            url, ref = git_ref(entry)
            if self.where(url, ref) is None:
                return (
                    f"download {url} ({ref}, REQUIRED_GIT) is not in stage4's source cache and cannot be "
                    f"reached; seed it with `stage4 sources import {url} --ref {ref} DIR`"
                )
        if download:
            return download
        for dependency in module.dependencies:
            if reasons.get(dependency):
                return f"it requires module {dependency}, which is not ready"
        return None


def _download_reason(in_layer: list[str], starts: list[str], served: list[Entry]) -> str | None:
    """Why the downloads a module makes inside the layer cannot be served here, if they cannot."""
    if not in_layer or served:
        return None
    calls = f"module.build downloads inside the layer ({', '.join(in_layer)})"
    if not starts:
        return f"{calls} from URLs it does not name; stage4 serves downloads only from its source cache"
    return (
        f"{calls} from {' or '.join(s + '...' for s in starts)}, and stage4's source cache has nothing "
        "there: seed each URL with `stage4 sources import URL FILE --download` (git: `--ref REF DIR`)"
    )
