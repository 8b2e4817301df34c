"""CLI: `stage4 diff A B` (two manifests, two built images, or two exported revisions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from stage4 import api
from stage4 import diff as diff_mod

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.command("diff")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--files", is_flag=True, help="also compare every file of the two root filesystems")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (for CI)")
@click.pass_obj
def diff(obj: CliSettings, a: Path, b: Path, files: bool, as_json: bool) -> None:
    """What changed from A to B: packages, kernel, initramfs and kernel modules, sizes, layer identities.

    A and B: a manifest (prod.json), a built image (the manifest beside it), a publication record
    (publication.r<RID>.json) or an exported revision in a store (<store>/<name>.r<RID>).
    """
    found = api.diff(a, b, files=files, debug=obj.debug)
    click.echo(json.dumps(found, indent=2) if as_json else diff_mod.text(found), nl=as_json)


COMMANDS: list[click.Command] = [diff]
