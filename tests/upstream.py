"""For end-to-end tests that build from public repositories: the default components (dnbd3, xloop), mltk.

Build hosts without internet take them from stage4's source cache, seeded once with
`stage4 sources import URL DIR`. A test calls `require_upstream(cache_dir)` (or `require_git(cache_dir,
url, ref)`) before building: it skips with one line saying how to provide a missing source, and copies
sources that the shared cache (~/.cache/stage4) holds into a test's own cache folder, so that a build with
an empty cache still finds them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stage4 import config
from stage4.errors import StepFailed
from stage4.provisioning.source_cache import GIT_ENV, PROBE_TIMEOUT, SourceCache
from stage4.runner import Runner

SHARED_CACHE = Path("~/.cache/stage4").expanduser()


def require_upstream(cache_dir: Path, names: tuple[str, ...] = ("dnbd3", "xloop")) -> None:
    """Skip unless each named default component's git source is cached in `cache_dir` (or in the shared
    cache, from which it is copied) or its URL is reachable."""
    for name in names:
        source = config.default_components()[name].source
        require_git(cache_dir, source.git, source.ref)


def require_git(cache_dir: Path, url: str, ref: str = "master") -> None:
    """Skip unless (url, ref) is cached in `cache_dir` (or in the shared cache, from which it is copied)
    or the URL is reachable."""
    cache, shared, runner = SourceCache(cache_dir), SourceCache(SHARED_CACHE), Runner()
    if cache.git_entry(url, ref):
        return
    kept = shared.git_entry(url, ref)
    if kept and shared.root != cache.root:
        cache.import_git(url, ref, shared.mirror(url), runner, at=kept.commit)
        return
    try:
        runner.run(
            ["git", "ls-remote", url, ref],
            step=f"reach {url}",
            env=GIT_ENV,
            capture=True,
            timeout=PROBE_TIMEOUT,
        )
    except StepFailed:
        repo = url.split("://", 1)[-1].split("/", 1)[-1].removesuffix(".git")
        ref_option = "" if ref == "master" else f" --ref {ref}"
        pytest.skip(
            f"no checkout of {repo} in stage4's source cache ({cache.root}): fetch a copy and run "
            f"`stage4 sources import {url}{ref_option} DIR`"
        )
