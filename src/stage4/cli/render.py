"""CLI: `stage4 render` (installer-driven bases)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from stage4 import api

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.command("render")
@click.argument("targets", nargs=-1, metavar="[DISTRO|IMAGE]...")
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="directory for the template tree (created; existing files are replaced)",
)
@click.option(
    "--identifier",
    default=None,
    help="root partition GPT name and filesystem label (default: SLX_SYS or the image's)",
)
@click.option(
    "--filesystem",
    type=click.Choice(["ext4", "btrfs", "xfs"]),
    default=None,
    help="root filesystem (default: ext4 or the image's)",
)
@click.option(
    "--efi/--bios",
    "efi",
    default=None,
    help="UEFI install (EFI system partition, OVMF firmware) or BIOS (default: the image's efi, else BIOS)",
)
@click.option(
    "--iso",
    default=None,
    help="installer ISO, a local path or a URL (one DISTRO only; default: the "
    "image's iso, else the catalog's)",
)
@click.option(
    "--iso-checksum",
    default=None,
    help="sha256:<hex>, a bare digest, or a checksum file (path or file:<URL>); required with --iso",
)
@click.option(
    "--ssh-timeout",
    default=None,
    help="how long Packer waits for the installed system (bounds the installer's run; default: the "
    "image's installer_timeout, 60m)",
)
@click.pass_obj
def render(
    obj: CliSettings,
    targets: tuple[str, ...],
    output: Path,
    identifier: str | None,
    filesystem: str | None,
    efi: bool | None,
    iso: str | None,
    iso_checksum: str | None,
    ssh_timeout: str | None,
) -> None:
    """Write Packer templates and answer files for DISTROs (or images of the project file, with all
    their settings; options given here replace them).

    The tree works with Packer alone: `packer build -only=qemu -var-file=base.json <distro>-amd64.json`
    (Packer 1.6.x) or `packer build -var-file=base.pkrvars.hcl <distro>-amd64.pkr.hcl` (current Packer).
    Without arguments: every distribution that has an installer.
    """
    cfg = obj.config()
    overrides: dict[str, object] = {
        key: value
        for key, value in (("identifier", identifier), ("filesystem", filesystem))
        if value is not None
    }
    rendered = api.render(
        cfg,
        list(targets),
        output,
        overrides,
        debug=obj.debug,
        efi=efi,
        iso=iso,
        iso_checksum=iso_checksum,
        ssh_timeout=ssh_timeout,
    )
    for template in rendered:
        click.echo(
            f"{template.distribution:14} {output / template.json_template.name}  "
            f"{output / template.hcl_template.name}"
        )
    click.echo(
        f"run in {output}: packer build -only=qemu -var-file=base.json {rendered[0].json_template.name}"
    )


COMMANDS: list[click.Command] = [render]
