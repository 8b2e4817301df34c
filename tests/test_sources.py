"""The source cache: `stage4 sources import`, listing, and builds' fetch() without a network.

The "remote" URLs are on loopback port 9, where nothing listens: every network attempt fails at once, as
on a build host without internet. A file:// URL stands in for a reachable remote. Results are checked with
git and tar, which did not write them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from stage4 import api, config
from stage4.config import SourceConfig
from stage4.errors import StepFailed
from stage4.provisioning import sources
from stage4.provisioning.source_cache import SourceCache
from stage4.runner import Runner
from stage4.ui import BuildLog, Display
from tests.conftest import STAGE4
from tests.upstream import require_upstream

OFFLINE_URL = "http://127.0.0.1:9/demo.git"
OFFLINE_TARBALL = "http://127.0.0.1:9/demo-1.0.tar.gz"


def git(*args: str | Path, cwd: Path) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["git", *map(str, args)], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """A clone with two commits on master; tag v1 is the first."""
    repo = tmp_path / "demo"
    repo.mkdir()
    git("init", "-q", "-b", "master", cwd=repo)
    (repo / "version").write_text("one\n")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "one", cwd=repo)
    git("tag", "-a", "v1", "-m", "v1", cwd=repo)
    (repo / "version").write_text("two\n")
    (repo / "tools").mkdir()
    (repo / "tools" / "build.sh").write_text("#!/bin/sh\n")
    (repo / "tools" / "build.sh").chmod(0o755)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "two", cwd=repo)
    return repo


def stage4(*args: str | Path, cache: Path) -> subprocess.CompletedProcess:
    project = cache.parent / "stage4.toml"
    project.write_text(f'[build]\ncache_dir = "{cache}"\n')
    return subprocess.run(
        [STAGE4, "-c", project, *map(str, args)], check=False, capture_output=True, text=True
    )


def capturing_runner(tmp: Path, name: str = "fetch") -> tuple[Runner, io.StringIO, Path]:
    """A runner whose info lines land in a buffer and whose commands land in a log file."""
    shown = io.StringIO()
    log = tmp / f"{name}.log"
    return Runner(Display(console=Console(file=shown, width=400), log=BuildLog(log))), shown, log


def fetched_tree(tarball: Path, into: Path) -> Path:
    into.mkdir()
    subprocess.run(["tar", "-xzf", tarball, "-C", into], check=True)
    return into


def test_import_then_offline_fetch_gives_the_tree_at_the_ref(tmp_path: Path, upstream: Path) -> None:
    cache = tmp_path / "cache"
    done = stage4("sources", "import", OFFLINE_URL, upstream, cache=cache)
    assert done.returncode == 0, done.stderr
    master = git("rev-parse", "master", cwd=upstream)
    assert master in done.stdout
    git("commit", "-q", "--allow-empty", "-m", "after the import", cwd=upstream)

    runner, shown, _ = capturing_runner(tmp_path)
    tarball = sources.fetch(
        "demo", SourceConfig(git=OFFLINE_URL), tmp_path / "work", runner, "fetch demo", cache
    )
    tree = fetched_tree(tarball, tmp_path / "tree")
    assert (tree / "version").read_text() == "two\n"
    assert (tree / "tools" / "build.sh").stat().st_mode & 0o111
    assert not (tree / ".git").exists()
    info = shown.getvalue()
    assert (
        OFFLINE_URL in info
        and "'master'" in info
        and master[:12] in info
        and f"imported from {upstream}" in info
    )

    tarball = sources.fetch(
        "demo", SourceConfig(git=OFFLINE_URL, ref="master"), tmp_path / "work", runner, "fetch demo", cache
    )
    assert fetched_tree(tarball, tmp_path / "again").joinpath("version").read_text() == "two\n"


def test_tag_and_commit_refs(tmp_path: Path, upstream: Path) -> None:
    cache = tmp_path / "cache"
    first = git("rev-parse", "v1^{commit}", cwd=upstream)
    for ref in ("v1", first):
        done = stage4("sources", "import", OFFLINE_URL, "--ref", ref, upstream, cache=cache)
        assert done.returncode == 0, done.stderr
    runner, _, log = capturing_runner(tmp_path)
    tag = sources.fetch(
        "demo", SourceConfig(git=OFFLINE_URL, ref="v1"), tmp_path / "w1", runner, "fetch", cache
    )
    assert fetched_tree(tag, tmp_path / "tag").joinpath("version").read_text() == "one\n"
    assert "ls-remote" in log.read_text()

    # A commit id names one tree forever: the cache serves it without asking the network.
    runner, shown, log = capturing_runner(tmp_path, "pinned")
    pinned = sources.fetch(
        "demo", SourceConfig(git=OFFLINE_URL, ref=first), tmp_path / "w2", runner, "fetch", cache
    )
    assert fetched_tree(pinned, tmp_path / "pinned").joinpath("version").read_text() == "one\n"
    assert "ls-remote" not in log.read_text() and "not reachable" not in shown.getvalue()


def test_without_cache_and_network_one_line_names_the_import_command(tmp_path: Path) -> None:
    runner, _, _ = capturing_runner(tmp_path)
    expected = (
        re.escape(f"fetch demo failed: cannot fetch {OFFLINE_URL} (")
        + ".*"
        + re.escape(f") and stage4's source cache ({tmp_path / 'cache' / 'sources'}) has no copy of 'v2'; ")
        + ".*"
        + re.escape(f"`stage4 sources import {OFFLINE_URL} --ref v2 DIR`")
    )
    with pytest.raises(StepFailed, match="^" + expected) as failed:
        sources.fetch(
            "demo",
            SourceConfig(git=OFFLINE_URL, ref="v2"),
            tmp_path / "work",
            runner,
            "fetch demo",
            tmp_path / "cache",
        )
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("fetch demo failed: cannot fetch http://127.0.0.1:9/demo.git")
    assert f"`stage4 sources import {OFFLINE_URL} --ref v2 DIR`" in message


@pytest.mark.parametrize("case", ["missing ref", "not a repository", "inside a repository", "no directory"])
def test_import_refuses_bad_input_with_one_line(tmp_path: Path, upstream: Path, case: str) -> None:
    cache = tmp_path / "cache"
    plain = tmp_path / "plain"
    plain.mkdir()
    args = {
        "missing ref": ["--ref", "v9", upstream],
        "not a repository": [plain],
        "inside a repository": [upstream / "tools"],
        "no directory": [tmp_path / "absent"],
    }[case]
    done = stage4("sources", "import", OFFLINE_URL, *args, cache=cache)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage4: error: ") and "Traceback" not in done.stderr
    assert str(args[-1]) in lines[0]
    if case == "missing ref":
        assert "'v9'" in lines[0]
    assert not list((cache / "sources").glob("git/*/refs.json"))


def test_tarball_import_verify_and_offline_use(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "demo-1.0").mkdir()
    (tmp_path / "demo-1.0" / "Makefile").write_text("all:\n")
    tarball = tmp_path / "demo-1.0.tar.gz"
    subprocess.run(["tar", "-czf", tarball, "-C", tmp_path, "demo-1.0"], check=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()

    wrong = stage4("sources", "import", OFFLINE_TARBALL, "--sha256", "0" * 64, tarball, cache=cache)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert digest in wrong.stderr and not list((cache / "sources").glob("tarball/*"))
    done = stage4("sources", "import", OFFLINE_TARBALL, "--sha256", digest, tarball, cache=cache)
    assert done.returncode == 0, done.stderr

    runner, _, _ = capturing_runner(tmp_path)
    source = SourceConfig(tarball=OFFLINE_TARBALL, sha256=digest)
    fetched = sources.fetch("demo", source, tmp_path / "work", runner, "fetch demo", cache)
    assert (fetched_tree(fetched, tmp_path / "tree") / "Makefile").read_text() == "all:\n"

    # A cached copy that no longer matches is dropped, never used; offline that ends the fetch.
    kept = SourceCache(cache).tarball_path(digest)
    kept.write_bytes(kept.read_bytes() + b"\0")
    expected = (
        re.escape(f"fetch demo failed: cannot fetch {OFFLINE_TARBALL}: ")
        + ".*"
        + re.escape(f"`stage4 sources import {OFFLINE_TARBALL} --sha256 {digest} FILE`")
    )
    with pytest.raises(StepFailed, match="^" + expected) as failed:
        sources.fetch("demo", source, tmp_path / "work", runner, "fetch demo", cache)
    assert f"`stage4 sources import {OFFLINE_TARBALL} --sha256 {digest} FILE`" in str(failed.value)
    assert not kept.exists()


def test_listing_shows_git_and_tarball_entries(tmp_path: Path, upstream: Path) -> None:
    cache = tmp_path / "cache"
    tarball = tmp_path / "t.tar"
    subprocess.run(["tar", "-cf", tarball, "-C", upstream, "version"], check=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    empty = stage4("sources", cache=cache)
    assert empty.returncode == 0 and "no sources cached" in empty.stdout
    cfg = config.from_dict({"build": {"cache_dir": str(cache)}}, str(tmp_path / "stage4.toml"))
    api.import_source(cfg, OFFLINE_URL, upstream)
    api.import_source(cfg, OFFLINE_URL, upstream, ref="v1")
    api.import_source(cfg, OFFLINE_TARBALL, tarball, sha256=digest)

    listed = json.loads(stage4("sources", "--json", cache=cache).stdout)
    by_key = {(e["kind"], e["ref"] or e["sha256"]): e for e in listed}
    assert set(by_key) == {("git", "master"), ("git", "v1"), ("tarball", digest)}
    assert by_key["git", "master"]["commit"] == git("rev-parse", "master", cwd=upstream)
    assert by_key["git", "v1"]["commit"] == git("rev-parse", "v1^{commit}", cwd=upstream)
    assert by_key["tarball", digest]["size"] == tarball.stat().st_size
    assert all(e["url"] in (OFFLINE_URL, OFFLINE_TARBALL) and e["from"] and e["when"] for e in listed)

    text = stage4("sources", cache=cache).stdout.splitlines()
    assert len(text) == 3 and any(OFFLINE_URL in line and "v1" in line for line in text)

    assert stage4("sources", "remove", OFFLINE_URL, "--ref", "v1", cache=cache).returncode == 0
    api.remove_source(cfg, "", sha256=digest)
    assert [(e.kind, e.ref) for e in api.sources(cfg)] == [("git", "master")]


def test_a_reachable_remote_refreshes_the_cache(tmp_path: Path, upstream: Path) -> None:
    cache = tmp_path / "cache"
    url = upstream.as_uri()
    runner, shown, _ = capturing_runner(tmp_path)
    sources.fetch("demo", SourceConfig(git=url), tmp_path / "w1", runner, "fetch", cache)
    git("commit", "-q", "--allow-empty", "-m", "three", cwd=upstream)
    newest = git("rev-parse", "master", cwd=upstream)
    sources.fetch("demo", SourceConfig(git=url), tmp_path / "w2", runner, "fetch", cache)
    assert SourceCache(cache).git_entry(url, "master").commit == newest
    assert shown.getvalue() == ""

    shutil.move(upstream, tmp_path / "gone")  # the host goes offline
    sources.fetch("demo", SourceConfig(git=url), tmp_path / "w3", runner, "fetch", cache)
    assert newest[:12] in shown.getvalue() and "(fetched " in shown.getvalue()


def test_require_upstream_passes_with_cached_default_sources(tmp_path: Path, upstream: Path) -> None:
    cache = SourceCache(tmp_path / "cache")
    for url in ("https://github.com/bwLehrpool/dnbd3.git", "https://github.com/bwLehrpool/xloop.git"):
        cache.import_git(url, "master", upstream, Runner(Display(console=Console(file=io.StringIO()))))
    try:
        require_upstream(tmp_path / "cache")
    except pytest.skip.Exception as skipped:
        pytest.fail(f"skipped although both sources are cached: {skipped}")


def test_cached_tarball_is_a_tar_of_the_source(tmp_path: Path, upstream: Path) -> None:
    """fetch() of a git source yields a tarball whose members are the tree, as git lists it."""
    cache = tmp_path / "cache"
    assert stage4("sources", "import", OFFLINE_URL, upstream, cache=cache).returncode == 0
    runner, _, _ = capturing_runner(tmp_path)
    tarball = sources.fetch("demo", SourceConfig(git=OFFLINE_URL), tmp_path / "work", runner, "fetch", cache)
    with tarfile.open(tarball) as archive:
        files = sorted(m.name for m in archive.getmembers() if m.isfile())
    assert files == sorted(git("ls-tree", "-r", "--name-only", "master", cwd=upstream).splitlines())
