"""CLI: `stage4 mltk plan [IMAGE...]`: each image's mltk modules and whether they can run here."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from stage4 import api
from stage4.errors import EXIT_FAILURE

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.group("mltk")
def mltk() -> None:
    """bwLehrpool mltk modules ([images.NAME.mltk])."""


@mltk.command("plan")
@click.argument("images", nargs=-1)
@click.pass_obj
def plan(obj: CliSettings, images: tuple[str, ...]) -> None:
    """Before any layer: each module of IMAGE (default: every image with mltk modules), targets expanded,
    in build order, with the packages it installs, the downloads it needs and whether it can run on this
    host, else its one reason (the line the build refuses it with). Exits 1 when any module cannot run.
    """
    reports = api.mltk_plan(obj.config(), list(images), debug=obj.debug)
    for report in reports:
        click.echo(f"image {report.image} ({report.distro}; {report.index})")
        for entry in report.modules:
            click.echo(f"{entry.order:4}  {entry.module.name}  ({entry.module.path})")
            click.echo(f"        packages: {' '.join(entry.packages) or '-'}")
            for download in entry.downloads or ["-"]:
                click.echo(f"        download: {download}")
            click.echo(f"        {entry.line if entry.reason else 'ready'}")
    ready = sum(len(r.modules) - len(r.not_ready) for r in reports)
    click.echo(f"{ready} of {sum(len(r.modules) for r in reports)} modules ready")
    if ready < sum(len(r.modules) for r in reports):
        sys.exit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [mltk]
