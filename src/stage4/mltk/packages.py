"""The package names an image's distribution has, read without the network, for `stage4 mltk plan`.

The host's own package manager answers for the host's distribution, not the image's, so stage4 reads apt
package indexes (`Packages` files, plain or compressed) of the image's release:
1. `CACHE/apt-lists/DISTRO/` (CACHE: stage4's cache folder): Packages files put there, e.g. copied from
   the /var/lib/apt/lists of a machine or build of that release;
2. else the host's /var/lib/apt/lists, only the indexes whose Release file names the release's codename
   as its suite (CODENAME, CODENAME-updates, CODENAME-security), the distribution as its origin, and one
   of the components stage4's images use (Debian: main).
A package counts when it is a package or a virtual package (`Provides:`) of those indexes. When neither
holds an index of the release (an RPM-based one, or Debian 13 on a Debian 12 host), packages are not
checked and the plan says so: a module is then not refused for its packages.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import subprocess
from pathlib import Path

from stage4 import distributions
from stage4.distributions.apt import AptDistribution
from stage4.errors import InputError

HOST_LISTS = Path("/var/lib/apt/lists")
ARCH = "amd64"
_NAMES = re.compile(rb"^(?:Package|Provides):\s*(.+)$", re.MULTILINE)


def _read(path: Path) -> bytes:
    suffix = path.suffix
    if suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if suffix == ".bz2":
        return bz2.decompress(path.read_bytes())
    if suffix == ".lz4":
        return subprocess.run(["lz4", "-dc", path], capture_output=True, check=True).stdout
    return path.read_bytes()


def _names(text: bytes) -> set[str]:
    names: set[str] = set()
    for match in _NAMES.finditer(text):
        for item in match.group(1).split(b","):
            name = item.split(b"(")[0].split(b":")[0].strip()
            if name:
                names.add(name.decode())
    return names


class PackageIndex:
    def __init__(self, distro: str, names: set[str] | None, description: str):
        self.distro, self.names, self.description = distro, names, description

    def missing(self, packages: list[str]) -> list[str]:
        if self.names is None:
            return []
        return [p for p in packages if p not in self.names]

    @classmethod
    def load(cls, distro: str, cache_dir: Path, host_lists: Path = HOST_LISTS) -> PackageIndex:
        own = cache_dir / "apt-lists" / distro
        files = sorted(p for p in own.glob("*Packages*") if p.is_file()) if own.is_dir() else []
        where = str(own)
        if not files:
            files, where = _host_indexes(distro, host_lists), f"the host's apt lists ({host_lists})"
        if not files:
            return cls(
                distro,
                None,
                f"packages not checked: no package index of {distro} in {own} or {host_lists}",
            )
        names: set[str] = set()
        try:
            for path in files:
                names |= _names(_read(path))
        except (OSError, EOFError, lzma.LZMAError, subprocess.CalledProcessError) as exc:
            raise InputError(f"{path}: cannot read this package index ({exc})") from None
        return cls(distro, names, f"checked against {len(files)} package indexes of {distro} in {where}")


def _host_indexes(distro: str, lists: Path) -> list[Path]:
    try:
        release = distributions.get(distro)
    except InputError:
        return []
    if not issubclass(release, AptDistribution) or not lists.is_dir():
        return []
    suites = {release.codename, f"{release.codename}-updates", f"{release.codename}-security"}
    origin = release.family.capitalize()
    found = []
    for meta in sorted([*lists.glob("*_InRelease"), *lists.glob("*_Release")]):
        text = meta.read_text(errors="replace")
        fields = dict(re.findall(r"^(Origin|Suite|Codename):\s*(\S+)", text, re.MULTILINE))
        if fields.get("Origin") != origin or fields.get("Codename", fields.get("Suite")) not in suites:
            continue
        stem = meta.name.rsplit("_", 1)[0]
        for component in release.components:
            found += sorted(lists.glob(f"{stem}_{component}_binary-{ARCH}_Packages*"))
    return found
