"""CLI: `stage4 clean`: free the work directories that killed or interrupted builds left in the cache."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from stage4 import api
from stage4.workdirs import readable_size

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.command("clean")
@click.argument("images", nargs=-1)
@click.option(
    "--cache",
    is_flag=True,
    help="also remove the caches kept between builds, shared by all images (downloaded packages, "
    "initramfs images, the accelerator probe, the bases' kept root trees)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def clean(obj: CliSettings, images: tuple[str, ...], cache: bool, as_json: bool) -> None:
    """Remove the work directories of IMAGES (default: every image with some in the cache).

    A build killed outright (SIGKILL, the OOM killer) can leave processes, mounts, loop devices and its work
    directory; these are ended, unmounted, detached and removed (the next build of the image does the same).
    A work directory kept to resume an interrupted build is removed too. Images being built are left alone.
    """
    report = api.clean(obj.config(), images=list(images) or None, cache=cache, debug=obj.debug)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "freed_bytes": report.bytes,
                    "busy": report.busy,
                    "removed": [
                        {"path": str(item.path), "state": item.state, "bytes": item.bytes}
                        for item in report.freed
                    ],
                },
                indent=2,
            )
        )
        return
    for item in report.freed:
        click.echo(f"removed {item.path} ({item.state}): {readable_size(item.bytes)}")
    for image in report.busy:
        click.echo(f"{image}: a build is running; left alone")
    click.echo(f"freed {report.bytes} bytes ({readable_size(report.bytes)})")


COMMANDS: list[click.Command] = [clean]
