"""Component and dracut-module sources: fetched on the host, handed to the layer as one tarball.

A git source is checked out at its ref, a tarball is downloaded (or read) and checked against its sha256,
a local directory is used as it is. Each becomes `<work>/sources/<name>.tar.gz`, which the Ansible roles
unpack inside the layer; the same code serves the chroot and the VM way.

Git sources and tarballs go through stage4's source cache (source_cache.py): a commit id or a
sha256 already cached is used without the network; a branch or tag is looked up on the network briefly
and, when the host is offline, taken from the cache with a line saying which commit and from when.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from stage4.config import SourceConfig
from stage4.errors import InputError, StepFailed
from stage4.fsutil import sha256_file
from stage4.provisioning.source_cache import FULL_COMMIT, SourceCache, Unreachable
from stage4.runner import Runner


def tree_digest(root: Path) -> str:
    """Hash of the names, modes and contents of every file below `root` (symlinks by their target)."""
    digest = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "__pycache__"))
        for name in sorted(files):
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            digest.update(f"{relative}\0{path.lstat().st_mode & 0o7777:o}\0".encode())
            digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def identity_inputs(source: SourceConfig) -> dict[str, str | bool | None]:
    """What a source contributes to a layer identity: its URL and ref, its checksum, or its content."""
    if source.git:
        return {"git": source.git, "ref": source.ref}
    if source.tarball:
        return {"tarball": source.sha256}
    path = _directory(source)
    if not path.is_dir():
        return {"path": str(path), "missing": True}
    return {"path_content": tree_digest(path)}


def _directory(source: SourceConfig) -> Path:
    """The folder of a source given neither as git nor as tarball (SourceConfig requires exactly one)."""
    if source.path is None:
        raise InputError("a source needs one of git, tarball or path")
    return source.path


def fetch(
    name: str, source: SourceConfig, sources_dir: Path, runner: Runner, step: str, cache_dir: Path
) -> Path:
    """`<sources_dir>/<name>.tar.gz` holding the source tree at its top level (`cache_dir`: stage4's
    cache)."""
    sources_dir.mkdir(parents=True, exist_ok=True)
    target = sources_dir / f"{name}.tar.gz"
    tree = sources_dir / name
    if tree.exists():
        shutil.rmtree(tree)
    cache = SourceCache(cache_dir)
    if source.git:
        _git_tree(source.git, source.ref, tree, cache, runner, step)
        root = tree
    elif source.tarball:
        if source.sha256 is None:
            raise InputError(f"tarball {source.tarball}: a tarball needs its sha256")
        root = _unpack_tarball(source.tarball, source.sha256, tree, cache, runner, step)
    else:
        root = _directory(source)
        if not root.is_dir():
            raise StepFailed(step, f"source directory {root} does not exist", runner.log_path)
    with tarfile.open(target, "w:gz") as archive:
        for entry in sorted(root.iterdir()):
            if entry.name != ".git":
                archive.add(entry, arcname=entry.name)
    return target


def top_level(tarball: Path) -> set[str]:
    """Names at the top of a source tarball made by fetch()."""
    with tarfile.open(tarball) as archive:
        return {name.split("/", 1)[0] for name in archive.getnames()}


def _git_tree(url: str, ref: str, tree: Path, cache: SourceCache, runner: Runner, step: str) -> None:
    if FULL_COMMIT.match(ref) and cache.has_commit(url, ref, runner, step):
        commit = ref.lower()  # a commit id names the same tree forever: no need to ask the network
    else:
        try:
            commit = cache.fetch_from_network(url, ref, runner, step)
        except Unreachable as exc:
            cached = cache.git_record(url, ref)
            if cached is None:
                raise StepFailed(
                    step,
                    f"cannot fetch {url} ({exc}) and stage4's source cache ({cache.root}) has "
                    f"no copy of {ref!r}; on a host without internet, clone it elsewhere, copy the "
                    f"clone here and run `stage4 sources import {url} --ref {ref} DIR`",
                    runner.log_path,
                ) from None
            how = "fetched" if cached["from"] == url else f"imported from {cached['from']}"
            runner.display.info(
                f"{step}: {url} is not reachable ({exc}); using the cached {ref!r} at commit "
                f"{cached['commit'][:12]} ({how} {cached['when']})"
            )
            commit = cached["commit"]
    cache.checkout(url, commit, tree, runner, step)


def _unpack_tarball(
    location: str, sha256: str, tree: Path, cache: SourceCache, runner: Runner, step: str
) -> Path:
    tarball = cache.tarball(sha256, runner) or _obtain_tarball(location, sha256, tree, cache, runner, step)
    tree.mkdir(parents=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(tree, filter="data")
    entries = list(tree.iterdir())
    # The usual project tarball has one top-level directory: that is the source tree.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else tree


def _obtain_tarball(
    location: str, sha256: str, tree: Path, cache: SourceCache, runner: Runner, step: str
) -> Path:
    """Download (or copy) the tarball at `location`, check its sha256 and keep it in the source cache."""
    remote = "://" in location
    download = tree.with_name(tree.name + ".download")
    try:
        if remote:
            with urllib.request.urlopen(location, timeout=60) as response, download.open("wb") as out:
                shutil.copyfileobj(response, out)
        else:
            shutil.copyfile(Path(location).expanduser(), download)
    except (OSError, urllib.error.URLError) as exc:
        download.unlink(missing_ok=True)
        hint = ""
        if remote:
            hint = (
                f"; on a host without internet, download it elsewhere, copy it here and run "
                f"`stage4 sources import {location} --sha256 {sha256} FILE`"
            )
        raise StepFailed(
            step, f"cannot fetch {location}: {getattr(exc, 'reason', exc)}{hint}", runner.log_path
        ) from None
    try:
        digest = sha256_file(download)
        if digest != sha256:
            raise StepFailed(
                step,
                f"checksum mismatch for {location}: expected sha256 {sha256}, got {digest}",
                runner.log_path,
            )
        cache.add_tarball(location, digest, download, location)
    finally:
        download.unlink()
    return cache.tarball_path(digest)
