"""Checks of command-line values shared by several commands: bad values end as click usage errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import click

from stage4 import config

# An image argument: an existing file (a directory is named as one, not as a missing file).
IMAGE_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


def check_identifier(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--identifier: the rules of the config key (without a filesystem: any label may be asked for)."""
    if value is not None and (problem := config.identifier_problem(value)):
        raise click.BadParameter(f"{value!r} {problem}")
    return value


def check_output_dir(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and (problem := config.directory_problem(value.absolute())):
        raise click.BadParameter(f"{str(value)!r}: {problem}")
    return value
