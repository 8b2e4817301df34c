"""CLI: serve, revisions, prune and `dnbd3 images|verify|get`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from stage4 import api
from stage4.cli.options import check_identifier
from stage4.dnbd3 import protocol
from stage4.dnbd3.store import parse_rid

TIMEOUT = click.FloatRange(min=0, min_open=True)


def _rid_option(value: str | None) -> int:
    return parse_rid(value) if value not in (None, "0") else 0


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2))


@click.command()
@click.argument("store", type=click.Path(path_type=Path, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=protocol.DEFAULT_PORT,
    show_default=True,
    help="TCP port (0: any free port, printed at start)",
)
@click.option(
    "--pidfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="write the pid here (for `stage4 export --reload-pidfile`)",
)
@click.option(
    "--alt-server",
    "alt_servers",
    multiple=True,
    metavar="IP:PORT",
    help="advertise this alternative server in GET_SERVERS replies (repeatable)",
)
@click.option("--verbose", is_flag=True, help="log every loaded image and rescan (warnings are always shown)")
def serve(
    store: Path, host: str, port: int, pidfile: Path | None, alt_servers: tuple[str, ...], verbose: bool
) -> None:
    """Serve STORE read-only over DNBD3: a DEVELOPMENT server for testing exports.

    Speaks the dnbd3-server protocol (handshake, GET_BLOCK, GET_SERVERS, GET_CRC32, KEEPALIVE, and
    GET /query?q=images on the same port) and reads the same store layout; RID 0 is the newest revision.
    SIGHUP rescans the store; SIGUSR1 checks every block against its `.crc` list. Blocks that fail their
    CRC are refused (connection closed) and logged. Production serving is dnbd3-server's job, not this
    command's.
    """

    def log(line: str) -> None:  # warnings (failed hash blocks) always, the rest with --verbose
        if verbose or line.startswith("WARNING"):
            click.echo(line, err=True)

    server = api.serve(store, host, port, alt_servers, log=log)
    bound_host, bound_port = server.address
    if pidfile is not None:
        pidfile.write_text(f"{os.getpid()}\n")
    previous = signal.signal(
        signal.SIGHUP, lambda *_: threading.Thread(target=server.rescan, daemon=True).start()
    )
    previous_usr1 = signal.signal(
        signal.SIGUSR1, lambda *_: threading.Thread(target=server.check_all, daemon=True).start()
    )
    click.echo(
        f"stage4 development DNBD3 server on {bound_host}:{bound_port}, store {store} "
        f"({len(server.registry.loaded())} images); Ctrl-C stops it",
        err=True,
    )
    try:
        server.serve_forever()
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
        server.close()
        if pidfile is not None:
            with contextlib.suppress(OSError):
                pidfile.unlink()


@click.command()
@click.argument("name")
@click.option(
    "--store", type=click.Path(path_type=Path, file_okay=False), required=True, help="the image store"
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--check",
    is_flag=True,
    help="also report incomplete revisions (left by a crashed export); exit 1 if there are any",
)
@click.option("--repair", is_flag=True, help="withdraw incomplete revisions (the image first)")
def revisions(name: str, store: Path, as_json: bool, check: bool, repair: bool) -> None:
    """List the complete revisions of image NAME in a store (image, .crc, boot files and record)."""
    if repair:
        withdrawn = api.repair_revisions(store, name)
        click.echo(f"{name}: withdrew " + (", ".join(f"r{r}" for r in withdrawn) if withdrawn else "nothing"))
        return
    states = api.revisions(store, name)
    rows = [state.row() for state in states if state.complete]
    broken = [state for state in states if not state.complete]
    if as_json:
        _echo_json(
            {
                "revisions": rows,
                "incomplete": [
                    {
                        "rid": s.rid,
                        "missing": [str(p) for p in s.missing],
                        "present": [str(p) for p in s.present],
                    }
                    for s in broken
                ],
            }
            if check
            else rows
        )
    elif not rows:
        click.echo(f"{name}: no revisions in {store}")
    for row in rows if not as_json else ():
        extra = " ".join(x for x in (row["published_at"] or "", (row["identity"] or "")[:16]) if x)
        click.echo(f"r{row['rid']:<6} {row['size']:>14} bytes  crc=yes  {extra}".rstrip())
    if check:
        for state in broken if not as_json else ():
            missing = ", ".join(p.name for p in state.missing)
            click.echo(f"r{state.rid:<6} INCOMPLETE: missing {missing} (`--repair` withdraws it)")
        if broken:
            sys.exit(1)


@click.command()
@click.argument("name")
@click.option(
    "--store", type=click.Path(path_type=Path, file_okay=False), required=True, help="the image store"
)
@click.option("--keep", type=int, required=True, help="how many of the newest revisions to keep (at least 1)")
@click.option("--protect", multiple=True, metavar="RID", help="never remove this revision (repeatable)")
@click.option("--dry-run", is_flag=True, help="only show what would be removed")
@click.option(
    "--reload-pidfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="send SIGHUP to this server afterwards so that it drops removed revisions",
)
@click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="HOST[:PORT]",
    help="DNBD3 server to ask for users of a revision before removing it (repeatable; default: the "
    "servers recorded at export)",
)
@click.option(
    "--force", is_flag=True, help="remove revisions even if a server reports users or cannot be asked"
)
def prune(
    name: str,
    store: Path,
    keep: int,
    protect: tuple[str, ...],
    dry_run: bool,
    reload_pidfile: Path | None,
    servers: tuple[str, ...],
    force: bool,
) -> None:
    """Remove old revisions of NAME, keeping the newest KEEP; never the newest, never a protected one, never
    the active one (the revision <boot-dir>/config points at), never one a DNBD3 server reports users for.

    Move clients (SLX_DNBD3_RID) to a kept revision first: a server keeps serving a removed file until
    its next rescan (SIGHUP).
    """
    removed = api.prune(
        store,
        name,
        keep,
        protect,
        dry_run=dry_run,
        reload_pidfile=reload_pidfile,
        servers=servers or None,
        force=force,
    )
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{name}: {verb} " + (", ".join(f"r{r}" for r in removed) if removed else "nothing"))


@click.group("dnbd3")
def dnbd3_group() -> None:
    """Talk to a DNBD3 server: list its images, verify a published image, download one."""


@dnbd3_group.command("images")
@click.argument("server")
@click.option("--timeout", type=TIMEOUT, default=10.0, show_default=True, help="seconds")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def images(server: str, timeout: float, as_json: bool) -> None:
    """List the images SERVER (host[:port]) has loaded (GET /query?q=images; a revision nobody has asked
    for since the server's last rescan is not listed)."""
    found = api.dnbd3_images(server, timeout=timeout)
    if as_json:
        _echo_json(found)
        return
    for image in sorted(found, key=lambda i: (str(i.get("name")), i.get("rid", 0))):
        click.echo(
            f"{image.get('name')}:{image.get('rid')}  {image.get('size')} bytes  "
            f"complete {image.get('complete')}%  problems {image.get('problems')}"
        )


@dnbd3_group.command("verify")
@click.argument("server")
@click.argument("name")
@click.option("--rid", default=None, help="revision (default 0: the newest the server has)")
@click.option(
    "--store",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="local store the image was published to: compare size, .crc and bytes with it",
)
@click.option(
    "--file",
    "published",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="compare with this file instead of the store's",
)
@click.option(
    "--sample",
    type=click.IntRange(1),
    default=None,
    help="check only this many 16 MiB blocks (the first, the last and random ones)",
)
@click.option(
    "--identifier",
    default=None,
    callback=check_identifier,
    help="root partition identifier (default: from the record, or SLX_SYS)",
)
@click.option(
    "--timeout", type=TIMEOUT, default=10.0, show_default=True, help="seconds per network operation"
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def verify_command(
    server: str,
    name: str,
    rid: str | None,
    store: Path | None,
    published: Path | None,
    sample: int | None,
    identifier: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Check image NAME on SERVER the way a client reads it; exit 1 if anything is wrong."""
    report = api.dnbd3_verify(
        server,
        name,
        _rid_option(rid),
        store=store,
        published=published,
        sample=sample,
        identifier=identifier,
        timeout=timeout,
    )
    if as_json:
        _echo_json(report.to_dict())
    else:
        for fact in report.facts:
            click.echo(f"  {fact}")
        click.echo(f"  checked {report.blocks_checked} of {report.blocks_total} hash blocks")
        for problem in report.problems:
            click.echo(f"  PROBLEM: {problem}")
        click.echo(
            f"{name}:{report.rid} on {server}: "
            + ("OK" if report.passed else f"FAILED ({len(report.problems)} problems)")
        )
    if not report.passed:
        sys.exit(1)


@dnbd3_group.command("get")
@click.argument("server")
@click.argument("name")
@click.option("--rid", default=None, help="revision (default 0: the newest)")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True, help="file to write"
)
@click.option(
    "--timeout", type=TIMEOUT, default=10.0, show_default=True, help="seconds per network operation"
)
def get(server: str, name: str, rid: str | None, output: Path, timeout: float) -> None:
    """Download image NAME from SERVER into a file (block CRCs checked when the server has a list)."""
    got_rid, size, sha256 = api.dnbd3_download(server, name, output, _rid_option(rid), timeout=timeout)
    click.echo(f"{name}:{got_rid}: {size} bytes to {output} (sha256 {sha256})")


COMMANDS: list[click.Command] = [serve, revisions, prune, dnbd3_group]
