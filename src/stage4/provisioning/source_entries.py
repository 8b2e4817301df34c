"""`stage4 sources`: what the source cache holds, seeding it from local copies, forgetting entries."""

from __future__ import annotations

from pathlib import Path

from stage4.config import Config, SourceConfig
from stage4.errors import InputError
from stage4.provisioning.source_cache import Entry, SourceCache
from stage4.runner import Runner
from stage4.ui import Display

DEFAULT_REF = SourceConfig.model_fields["ref"].default


def sources(config: Config) -> list[Entry]:
    """What stage4's source cache holds: git URLs at their refs, files (tarballs, downloads) by sha256."""
    return SourceCache(config.build.cache_dir).entries()


def import_source(
    config: Config,
    url: str,
    location: Path,
    ref: str | None = None,
    sha256: str | None = None,
    download: bool = False,
    debug: bool = False,
) -> Entry:
    """Seed the source cache from a local copy, so that builds naming `url` work offline.

    A git URL takes `ref` (default: the config's default ref) from the clone `location`; a tarball URL
    (`sha256` given) takes the file `location` after checking its sha256; a download (`download`: any
    file an mltk module fetches inside the layer, served there by its URL) takes the file `location`,
    checked against `sha256` when given.
    """
    if ref is not None and (sha256 is not None or download):
        raise InputError("give --ref (a git URL) or --sha256/--download (a file), not both")
    cache = SourceCache(config.build.cache_dir)
    if download:
        return cache.import_download(url, location, sha256)
    if sha256 is not None:
        return cache.import_tarball(url, sha256, location)
    return cache.import_git(url, ref or DEFAULT_REF, location, Runner(Display(debug=debug)))


def remove_source(
    config: Config, url: str, ref: str | None = None, sha256: str | None = None, debug: bool = False
) -> Entry:
    """Forget a cached source: a git URL at `ref` (default: the config's default ref), or a file."""
    cache = SourceCache(config.build.cache_dir)
    return cache.remove(url, ref or DEFAULT_REF, sha256, Runner(Display(debug=debug)))
