"""CLI: `stage4 render` (installer-driven bases)."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import ValidationError

from stage4 import distributions
from stage4.builders.packer import DEFAULT_SSH_TIMEOUT, RenderTarget, render_tree
from stage4.config import ImageConfig
from stage4.errors import InputError
from stage4.runner import Runner
from stage4.ui import Display


def _image_for(name: str, configured: dict[str, ImageConfig], overrides: dict[str, object]) -> ImageConfig:
    """An image of the project file by its name, or a distribution with default settings."""
    if name in configured:
        base = configured[name].model_dump()
    elif name in distributions.names():
        base = {"distribution": name}
    else:
        raise InputError(
            f"{name!r} is neither an image of the project file nor a distribution; "
            f"distributions with an installer: {', '.join(distributions.installer_names())}"
        )
    try:
        return ImageConfig.model_validate({**base, **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        shown = f" = {error['input']!r}" if error["loc"] and not isinstance(error["input"], dict) else ""
        raise InputError(f"{name}: {key}{shown}: {error['msg'].removeprefix('Value error, ')}") from None


@click.command("render")
@click.argument("targets", nargs=-1, metavar="[DISTRO|IMAGE]...")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="directory for the template tree (created; existing files are replaced)")
@click.option("--identifier", default=None, help="root partition GPT name and filesystem label (default: SLX_SYS "
              "or the image's)")
@click.option("--filesystem", type=click.Choice(["ext4", "btrfs", "xfs"]), default=None,
              help="root filesystem (default: ext4 or the image's)")
@click.option("--efi", is_flag=True, help="UEFI install: EFI system partition, OVMF firmware")
@click.option("--iso", default=None, help="installer ISO, a local path or a URL (one DISTRO only)")
@click.option("--iso-checksum", default=None,
              help="sha256:<hex>, a bare digest, or a checksum file (path or file:<URL>); required with --iso")
@click.option("--ssh-timeout", default=DEFAULT_SSH_TIMEOUT, show_default=True,
              help="how long Packer waits for the installed system (bounds the installer's run)")
@click.pass_obj
def render(obj, targets: tuple[str, ...], output: Path, identifier: str | None, filesystem: str | None, efi: bool,
           iso: str | None, iso_checksum: str | None, ssh_timeout: str) -> None:
    """Write Packer templates and answer files for DISTROs (or images of the project file).

    The tree works with Packer alone: `packer build -only=qemu -var-file=base.json <distro>-amd64.json`
    (Packer 1.6.x) or `packer build -var-file=base.pkrvars.hcl <distro>-amd64.pkr.hcl` (current Packer).
    Without arguments: every distribution that has an installer.
    """
    cfg = obj.config()
    names = list(targets) or distributions.installer_names()
    if (iso or iso_checksum) and len(names) != 1:
        raise InputError("--iso and --iso-checksum apply to exactly one DISTRO")
    overrides: dict[str, object] = {}
    if identifier is not None:
        overrides["identifier"] = identifier
    if filesystem is not None:
        overrides["filesystem"] = filesystem
    render_targets = [
        RenderTarget(_image_for(name, cfg.images, overrides), efi=efi, iso=iso, iso_checksum=iso_checksum)
        for name in names
    ]
    runner = Runner(Display(debug=obj.debug))
    rendered = render_tree(output, render_targets, cfg.machine, runner, ssh_timeout=ssh_timeout)
    for template in rendered:
        click.echo(f"{template.distribution:14} {output / template.json_template.name}  "
                   f"{output / template.hcl_template.name}")
    click.echo(f"run in {output}: packer build -only=qemu -var-file=base.json {rendered[0].json_template.name}")


COMMANDS: list = [render]
