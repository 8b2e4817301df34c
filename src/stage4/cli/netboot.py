"""CLI: `stage4 netboot`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from stage4.dnbd3.store import parse_rid

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.command()
@click.argument("store", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.option("--rid", default=None, help="revision to boot (default: the newest)")
@click.option(
    "--active",
    is_flag=True,
    help="boot as a client of the active entry <boot-dir>/ipxe does: its kernel and initrd, "
    "<boot-dir>/config, and the revision that config names (not with --rid)",
)
@click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="HOST:PORT",
    help="a DNBD3 server on this machine (repeatable, tried in this order; default: a development "
    "server for STORE on a free loopback port)",
)
@click.option("--timeout", type=int, default=600, show_default=True, help="seconds to wait for the marker")
@click.option(
    "--boot-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="where kernel.r<RID>, initrd.r<RID>, config.r<RID>, ipxe.r<RID> are "
    "(default: <store>/.stage4/<name>)",
)
@click.option(
    "--log",
    "serial_log",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="serial log file",
)
@click.option(
    "--screenshot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="a desktop image: wait for its display manager's greeter, save the screen as this PNG",
)
@click.option(
    "--local-disk",
    metavar="SIZE|FILE",
    default=None,
    help="give the client a local disk for its writable layer: a new sparse one of SIZE (e.g. 8G) with a "
    "GPT partition named like SLX_WRITABLE_DEVICE_IDENTIFIER (default OPENSLX_SYS), or a raw disk image FILE",
)
@click.option("--persistent", is_flag=True, help="keep the writable layer across boots of this revision")
@click.option(
    "--boots", type=click.IntRange(1, 10), default=1, show_default=True, help="boot the client N times"
)
@click.option(
    "--kernel-arg",
    "kernel_args",
    multiple=True,
    metavar="ARG",
    help="one more kernel argument, last on the entry's command line (repeatable), "
    "e.g. rd.debug or profile=2",
)
@click.pass_obj
def netboot(
    obj: CliSettings,
    store: Path,
    name: str,
    rid: str | None,
    active: bool,
    servers: tuple[str, ...],
    timeout: int,
    boot_dir: Path | None,
    serial_log: Path | None,
    screenshot: Path | None,
    local_disk: str | None,
    persistent: bool,
    boots: int,
    kernel_args: tuple[str, ...],
) -> None:
    """Boot revision RID of NAME from STORE in qemu exactly as a Stage4 client does.

    Kernel and initramfs with the command line of the revision's iPXE entry, its config over HTTP (with
    the servers replaced by the forwarded ones) and the image over DNBD3, all on 127.0.0.1 and reached
    only through qemu's user network. Exits 0 only when userspace came up with / on the copy-on-write
    device over xloop over /dev/dnbd0. With --active: the active entry <boot-dir>/ipxe (written by
    `stage4 export --activate`) and <boot-dir>/config, so the revision booted is the one activated last.
    The copy-on-write layer is on the local disk with --local-disk, else in RAM.
    """
    from stage4 import api
    from stage4.errors import InputError

    if persistent and local_disk is None:
        raise InputError("--persistent needs --local-disk (the layer is kept on the client's local disk)")

    result = api.netboot(
        obj.config(),
        store,
        name,
        rid=parse_rid(rid) if rid is not None else None,
        servers=servers,
        timeout=timeout,
        boot_dir=boot_dir,
        serial_log=serial_log,
        debug=obj.debug,
        screenshot=screenshot,
        active=active,
        local_disk=local_disk,
        persistent=persistent,
        boots=boots,
        kernel_args=kernel_args,
    )
    share = 100 * result.dnbd3_bytes / result.image_size if result.image_size else 0
    click.echo(
        f"netbooted {result.name}:{result.rid} from {' '.join(result.servers)}: userspace marker after "
        f"{result.seconds:.0f} s on {result.accelerator}; read {result.dnbd3_bytes} bytes over DNBD3 "
        f"({share:.1f} % of the {result.image_size}-byte image)"
    )
    click.echo(f"  {result.root}")
    if active:
        click.echo("  the active revision, booted through <boot-dir>/ipxe with <boot-dir>/config")
    for layer in result.layers:
        click.echo(f"  {layer}")
    if result.display_manager:
        click.echo(f"  display manager: {result.display_manager} active")
    if screenshot is not None:
        click.echo(f"  screenshot: {screenshot}")
    click.echo(f"  serial log: {result.serial_log}")


COMMANDS: list[click.Command] = [netboot]
