"""CLI: `stage4 sources [import|remove]`: the source cache that lets hosts without internet build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from stage4 import api
from stage4.errors import InputError
from stage4.provisioning.source_cache import Entry

if TYPE_CHECKING:
    from stage4.cli import CliSettings


def _size(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.0f} KiB"


def _describe(entry: Entry) -> str:
    if entry.kind == "git":
        return f"{entry.url} {entry.ref} at commit {entry.commit}"
    return f"{entry.url} (sha256 {entry.sha256})"


@click.group("sources", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def sources(ctx: click.Context, as_json: bool) -> None:
    """List stage4's source cache: git URLs at a ref and tarballs by sha256, with where they came from.

    Builds use a cached source when its network copy cannot be reached (a commit id or a sha256 even
    without asking the network). `stage4 sources import` seeds the cache on a host without internet.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings: CliSettings = ctx.obj
    cfg = settings.config()
    entries = api.sources(cfg)
    if as_json:
        click.echo(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return
    if not entries:
        click.echo(
            f"no sources cached in {cfg.build.cache_dir / 'sources'}; "
            "seed it with `stage4 sources import URL [--ref REF] DIR`"
        )
        return
    for entry in entries:
        key = (
            f"{entry.ref}  {(entry.commit or '')[:12]}"
            if entry.kind == "git"
            else f"sha256 {(entry.sha256 or '')[:12]}"
        )
        click.echo(
            f"{entry.kind:8} {entry.url}  {key}  {_size(entry.size):>10}  {entry.when}  from {entry.origin}"
        )


@sources.command("import")
@click.argument("url")
@click.argument("location", metavar="DIR|FILE", type=click.Path(path_type=Path))
@click.option(
    "--ref", default=None, help="git: the branch, tag or commit of DIR to cache for URL (default: master)"
)
@click.option("--sha256", default=None, help="tarball: its SHA-256 (FILE must match it)")
@click.option(
    "--download",
    is_flag=True,
    help="FILE is what an mltk module downloads inside the layer from URL (any file; served there by URL)",
)
@click.pass_obj
def import_(
    obj: CliSettings, url: str, location: Path, ref: str | None, sha256: str | None, download: bool
) -> None:
    """Cache URL from a local copy: DIR, a clone of the git URL, or FILE, the tarball (with --sha256) or
    a download (with --download).

    A build whose source names URL (and REF, or the sha256) then works on this host without internet; an
    mltk module that downloads URL inside the layer gets FILE.
    """
    entry = api.import_source(
        obj.config(), url, location, ref=ref, sha256=sha256, download=download, debug=obj.debug
    )
    click.echo(f"cached {_describe(entry)} ({_size(entry.size)}) from {entry.origin}")


@sources.command("remove")
@click.argument("url", required=False)
@click.option("--ref", default=None, help="git: the ref to forget (default: master)")
@click.option("--sha256", default=None, help="tarball: forget the tarball with this SHA-256")
@click.pass_obj
def remove(obj: CliSettings, url: str | None, ref: str | None, sha256: str | None) -> None:
    """Forget a cached source: a git URL at a ref (its mirror goes with its last ref), or a tarball."""
    if url is None and sha256 is None:
        raise InputError("give a git URL (and --ref) or --sha256 of a tarball")
    entry = api.remove_source(obj.config(), url or "", ref=ref, sha256=sha256, debug=obj.debug)
    click.echo(f"removed {_describe(entry)}")


COMMANDS: list[click.Command] = [sources]
