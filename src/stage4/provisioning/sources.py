"""Component and dracut-module sources: fetched on the host, handed to the layer as one tarball.

A git source is cloned at its ref, a tarball is downloaded (or read) and checked against its sha256, a
local directory is used as it is. Each becomes `<work>/sources/<name>.tar.gz`, which the Ansible roles
unpack inside the layer; the same code serves the chroot and the VM way.
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
from stage4.errors import StepFailed
from stage4.runner import Runner

GIT_TIMEOUT = 300


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


def identity_inputs(source: SourceConfig) -> dict:
    """What a source contributes to a layer identity: its URL and ref, its checksum, or its content."""
    if source.git:
        return {"git": source.git, "ref": source.ref}
    if source.tarball:
        return {"tarball": source.sha256}
    if not source.path.is_dir():
        return {"path": str(source.path), "missing": True}
    return {"path_content": tree_digest(source.path)}


def fetch(name: str, source: SourceConfig, sources_dir: Path, runner: Runner, step: str) -> Path:
    """`<sources_dir>/<name>.tar.gz` holding the source tree at its top level."""
    sources_dir.mkdir(parents=True, exist_ok=True)
    target = sources_dir / f"{name}.tar.gz"
    tree = sources_dir / name
    if tree.exists():
        shutil.rmtree(tree)
    if source.git:
        _clone(source, tree, runner, step)
        root = tree
    elif source.tarball:
        root = _unpack_tarball(source, tree, runner, step)
    else:
        if not source.path.is_dir():
            raise StepFailed(step, f"source directory {source.path} does not exist", runner.log_path)
        root = source.path
    with tarfile.open(target, "w:gz") as archive:
        for entry in sorted(root.iterdir()):
            if entry.name != ".git":
                archive.add(entry, arcname=entry.name)
    return target


def top_level(tarball: Path) -> set[str]:
    """Names at the top of a source tarball made by fetch()."""
    with tarfile.open(tarball) as archive:
        return {name.split("/", 1)[0] for name in archive.getnames()}


def _clone(source: SourceConfig, tree: Path, runner: Runner, step: str) -> None:
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        runner.run(["git", "clone", "--quiet", "--no-checkout", source.git, tree], step=step, env=env,
                   timeout=GIT_TIMEOUT)
    except StepFailed as exc:
        detail = str(exc).split(" failed: ", 1)[-1].split(" (log: ")[0]
        raise StepFailed(step, f"cannot fetch {source.git} ({detail}); is the host online? A local "
                         "checkout can be given as source.path instead", runner.log_path) from None
    runner.run(["git", "-C", tree, "checkout", "--quiet", source.ref], step=step, env=env)


def _unpack_tarball(source: SourceConfig, tree: Path, runner: Runner, step: str) -> Path:
    download = tree.with_name(tree.name + ".download")
    location = source.tarball
    try:
        if "://" in location:
            with urllib.request.urlopen(location, timeout=60) as response, download.open("wb") as out:
                shutil.copyfileobj(response, out)
        else:
            shutil.copyfile(Path(location).expanduser(), download)
    except (OSError, urllib.error.URLError) as exc:
        raise StepFailed(step, f"cannot fetch {location}: {getattr(exc, 'reason', exc)}", runner.log_path) from None
    digest = hashlib.sha256(download.read_bytes()).hexdigest()
    if digest != source.sha256:
        download.unlink()
        raise StepFailed(step, f"checksum mismatch for {location}: expected sha256 {source.sha256}, "
                         f"got {digest}", runner.log_path)
    tree.mkdir(parents=True)
    with tarfile.open(download) as archive:
        archive.extractall(tree, filter="data")
    download.unlink()
    entries = list(tree.iterdir())
    # The usual project tarball has one top-level directory: that is the source tree.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else tree
