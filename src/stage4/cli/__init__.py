"""The `stage4` command: a thin shell over stage4.api (one module per command group).

Errors become one line and an exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from stage4 import api
from stage4 import config as config_mod
from stage4.cli.options import IMAGE_FILE, check_identifier, check_output_dir
from stage4.errors import EXIT_FAILURE, EXIT_INTERRUPTED, Interrupted, Stage4Error
from stage4.manifest import LAYERS
from stage4.runner import install_signal_handlers

# No emoji codes: 'a:b:c' (an IPv6 address) must not print as 'a🅱c'.
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


class CliSettings:
    def __init__(self, config_path: Path | None, debug: bool):
        self.config_path = config_path
        self.debug = debug

    def config(self) -> config_mod.Config:
        cfg = config_mod.load(self.config_path)
        for warning in cfg.warnings():
            err.print(f"stage4: warning: {warning}", markup=False)
        return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="project file (default: ./stage4.toml if present, else built-in defaults)",
)
@click.option("--debug", is_flag=True, help="show every command stage4 runs, with its output")
@click.version_option(package_name="stage4")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """Build network-bootable Stage4 images for OpenSLX / bwLehrpool DNBD3 clients."""
    ctx.obj = CliSettings(config_path, debug)


@cli.command()
@click.argument("images", nargs=-1)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    callback=check_output_dir,
    help="output directory",
)
@click.option(
    "--rebuild",
    multiple=True,
    type=click.Choice(LAYERS),
    help="rebuild this layer (and the layers above it) even if it is up to date",
)
@click.option(
    "--keep-dev", is_flag=True, help="keep the dev layer (dev.qcow2) after its results were extracted"
)
@click.pass_obj
def build(
    obj: CliSettings, images: tuple[str, ...], output: Path | None, rebuild: tuple[str, ...], keep_dev: bool
) -> None:
    """Build IMAGES (default: every image in the project file)."""
    results = api.build(
        obj.config(),
        images=list(images),
        output_dir=output,
        rebuild=set(rebuild),
        debug=obj.debug,
        keep_dev=keep_dev,
    )
    for result in results:
        click.echo(
            f"{result.name}: {result.image} ({'reused' if result.reused else 'built'}, "
            f"identity {result.identity[:16]})"
        )


@cli.command("layers")
@click.argument("images", nargs=-1)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="output directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def list_layers(obj: CliSettings, images: tuple[str, ...], output: Path | None, as_json: bool) -> None:
    """List each image's layer chain: identities, sizes and what is cached."""
    found = api.layers(obj.config(), images=list(images), output_dir=output)
    if as_json:
        click.echo(
            json.dumps({name: [s.to_dict() for s in statuses] for name, statuses in found.items()}, indent=2)
        )
        return
    for name, statuses in found.items():
        click.echo(name)
        for status in statuses:
            size = f"{status.size / (1 << 20):8.1f} MiB" if status.size is not None else "           -"
            ident = (status.identity or "-")[:16]
            click.echo(
                f"  {status.name:10} {ident:16} {size}  {status.state}"
                + (f"  {status.file}" if status.file else "")
            )


@cli.command()
@click.argument("image", type=IMAGE_FILE)
@click.option(
    "--identifier",
    default=None,
    callback=check_identifier,
    help="root partition identifier to check (default: from the image)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_obj
def inspect(obj: CliSettings, image: Path, identifier: str | None, as_json: bool) -> None:
    """Show an image's partitions, filesystems, kernels and qcow2 facts, and check the Stage4 requirements."""
    report = api.inspect(image, identifier=identifier, debug=obj.debug)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        report.print(Console(highlight=False))
    if not report.passed:
        sys.exit(1)


@cli.command()
@click.argument("image", type=IMAGE_FILE)
@click.option(
    "--via",
    type=click.Choice(["bootloader", "kernel"]),
    default="bootloader",
    show_default=True,
    help="boot with the image's own bootloader, or with kernel+initramfs taken out of the image",
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="boot this kernel instead (implies --via kernel)",
)
@click.option("--initrd", type=click.Path(path_type=Path, exists=True), default=None, help="with --kernel")
@click.option(
    "--identifier",
    default=None,
    callback=check_identifier,
    help="root partition identifier for root=PARTLABEL=",
)
@click.option(
    "--firmware",
    type=click.Choice(["bios", "uefi"]),
    default="bios",
    show_default=True,
    help="SeaBIOS, or OVMF for UEFI",
)
@click.option(
    "--writable", is_flag=True, help="write to the image (default: read-only snapshot, like a client)"
)
@click.option(
    "--timeout",
    type=click.IntRange(min=1),
    default=600,
    show_default=True,
    help="seconds to wait for the marker",
)
@click.option("--log", "serial_log", type=click.Path(path_type=Path), default=None, help="serial log file")
@click.option(
    "--screenshot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="a desktop image: wait for its display manager's greeter, save the screen as this PNG",
)
@click.option(
    "--kernel-arg",
    "kernel_args",
    multiple=True,
    metavar="ARG",
    help="one more kernel argument, last on the command line of a boot via kernel (repeatable), "
    "e.g. rd.debug or profile=2",
)
@click.pass_obj
def boot(
    obj: CliSettings,
    image: Path,
    via: str,
    kernel: Path | None,
    initrd: Path | None,
    identifier: str | None,
    firmware: str,
    writable: bool,
    timeout: int,
    serial_log: Path | None,
    screenshot: Path | None,
    kernel_args: tuple[str, ...],
) -> None:
    """Boot IMAGE in qemu and wait until its userspace is up; exit 0 only if it booted."""
    result = api.boot(
        obj.config(),
        image,
        via="kernel" if kernel else via,
        kernel=kernel,
        initrd=initrd,
        identifier=identifier,
        writable=writable,
        timeout=timeout,
        serial_log=serial_log,
        firmware=firmware,
        debug=obj.debug,
        screenshot=screenshot,
        kernel_args=kernel_args,
    )
    click.echo(
        f"booted: userspace marker after {result.seconds:.0f} s on {result.accelerator}; "
        f"serial log: {result.serial_log}"
    )
    if result.display_manager:
        click.echo(f"  display manager: {result.display_manager} active")
    if screenshot is not None:
        click.echo(f"  screenshot: {screenshot} ({result.screenshot_colours} colours)")


@cli.command("config")
@click.option("--reference", is_flag=True, help="print the reference of every key (Markdown)")
@click.pass_obj
def show_config(obj: CliSettings, reference: bool) -> None:
    """Show the effective configuration."""
    if reference:
        click.echo(config_mod.reference(), nl=False)
        return
    cfg = obj.config()
    click.echo(f"# from {cfg.source}")
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))


@cli.command("distributions")
def list_distributions() -> None:
    """List the distributions stage4 knows and how each can be built."""
    for dist in api.distributions():
        how = "bootstrap, packer" if dist.bootstrappable else "packer"
        click.echo(f"{dist.name:14} {dist.pretty_name:36} {how}")


def _register() -> None:
    """Each command group lives in its own module of this package and lists its commands in COMMANDS."""
    from stage4.cli import clean, diff, dnbd3, export, mltk, netboot, render, sources

    for module in (export, dnbd3, render, sources, clean, netboot, diff, mltk):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    install_signal_handlers()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("stage4: interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        err.print(f"stage4: error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    except Stage4Error as exc:
        err.print(f"stage4: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except (Interrupted, KeyboardInterrupt):
        err.print("stage4: interrupted; partial results were removed")
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        # A file stage4 meets that no check foresaw: name it, without a traceback.
        if "--debug" in sys.argv[1:]:
            raise
        where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
        err.print(f"stage4: error: {where + ': ' if where else ''}{exc.strerror or exc}", markup=False)
        sys.exit(EXIT_FAILURE)
    except Exception as exc:
        if "--debug" in sys.argv[1:]:
            raise
        err.print(
            f"stage4: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(--debug shows the traceback)",
            markup=False,
        )
        sys.exit(EXIT_FAILURE)
