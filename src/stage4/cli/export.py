"""CLI: `stage4 export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from stage4 import api

if TYPE_CHECKING:
    from stage4.cli import CliSettings


@click.command()
@click.argument("image", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--store",
    required=True,
    metavar="DIR|[USER@]HOST:/DIR",
    help="the dnbd3-server basePath: a local directory, or [user@]host:/path over SSH (uploads "
    "with rsync if both hosts have it, else scp; ssh reads ~/.ssh/config as usual)",
)
@click.option(
    "--ssh-option",
    "ssh_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="ssh_config(5) option for every ssh, scp and rsync call to a remote store (repeatable), "
    "e.g. --ssh-option Port=2222 --ssh-option IdentityFile=~/.ssh/store_key",
)
@click.option("--name", required=True, help="image name in the store, e.g. stage4/debian-12.qcow2")
@click.option(
    "--rid", default=None, help="revision to publish (default: the next free one); never overwritten"
)
@click.option(
    "--server",
    "servers",
    multiple=True,
    metavar="HOST[:PORT]",
    help="DNBD3 server the clients use (repeatable; goes into SLX_DNBD3_SERVERS)",
)
@click.option(
    "--identifier",
    default=None,
    help="root partition identifier (default: the manifest's, else what inspect finds)",
)
@click.option(
    "--kernel",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="kernel to publish as kernel.r<RID> (default: the dev run's, named by the manifest; "
    "else taken out of the image)",
)
@click.option(
    "--initrd",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="initramfs to publish as initrd.r<RID> (default: the dev run's, named by the manifest and "
    "checked for the configured dracut modules; else taken out of the image)",
)
@click.option("--no-boot-files", is_flag=True, help="publish no kernel and initrd")
@click.option(
    "--boot-dir",
    default=None,
    help="directory for kernel.r<RID>, initrd.r<RID>, config.r<RID>, ipxe.r<RID> (e.g. the HTTP "
    "boot dir, outside the store or hidden in it; default: <store>/.stage4/<name>)",
)
@click.option(
    "--config-tgz",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="the site's config.tgz (a gzip'ed tar, unpacked into / of each client): published as "
    "config.tgz.r<RID> in the boot directory and named by SLX_CONFIG_NAME in the revision's config",
)
@click.option(
    "--activate",
    is_flag=True,
    help="also make this revision the active one: replace <boot-dir>/config with its config and "
    "<boot-dir>/ipxe with an entry that boots its kernel and initrd and takes the revision from config",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="the image's stage4 manifest: build identity, identifier, kernel, initramfs and dracut "
    "modules (default: the .json beside the image)",
)
@click.option("--source-identity", default=None, help="build identity to record (overrides the manifest's)")
@click.option(
    "--reload-pidfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="send SIGHUP (rescan; not SIGUSR1) to the server with this pid file afterwards",
)
@click.option("--json", "as_json", is_flag=True, help="print the publication record as JSON")
@click.pass_obj
def export(
    obj: CliSettings | None,
    image: Path,
    store: str,
    ssh_options: tuple[str, ...],
    name: str,
    rid: str | None,
    servers: tuple[str, ...],
    identifier: str | None,
    kernel: Path | None,
    initrd: Path | None,
    no_boot_files: bool,
    boot_dir: str | None,
    config_tgz: Path | None,
    activate: bool,
    manifest: Path | None,
    source_identity: str | None,
    reload_pidfile: Path | None,
    as_json: bool,
) -> None:
    """Publish the standalone qcow2 IMAGE as a new revision of NAME in a DNBD3 image store.

    Writes <name>.r<RID> (padded to 4 KiB) and <name>.r<RID>.crc, never over an existing revision;
    kernel, initrd, the stage-3 config fragment and the iPXE entry of that revision into the boot
    directory; and a JSON record of the publication into <store>/.stage4/<name>/. Everything is checked
    and written under hidden names first; the image is linked last, so a failed export publishes nothing.

    A remote store (host:/path) is written over SSH without a password prompt (BatchMode): every file is
    uploaded under a hidden temporary name and published by a locked hard link on the store host, which
    needs a POSIX sh, flock(1) and GNU coreutils. Ports, users, identities and host keys come from
    ~/.ssh/config or from --ssh-option.
    """
    publication = api.export(
        image,
        store,
        name,
        debug=bool(getattr(obj, "debug", False)),
        rid=rid,
        kernel=kernel,
        initrd=initrd,
        servers=list(servers),
        identifier=identifier,
        source_identity=source_identity,
        manifest=manifest,
        reload_pidfile=reload_pidfile,
        boot_dir=boot_dir,
        activate=activate,
        boot_files=not no_boot_files,
        ssh_options=ssh_options,
        config_tgz=config_tgz,
    )
    if as_json:
        click.echo(json.dumps(publication.to_dict(), indent=2))
    else:
        click.echo(
            f"published {publication.name}:{publication.rid} -> {publication.image} "
            f"({publication.size} bytes, sha256 {publication.sha256[:16]}...)"
        )
        click.echo(f"  crc:    {publication.crc}")
        if publication.kernel:
            click.echo(f"  kernel: {publication.kernel}\n  initrd: {publication.initrd}")
        if publication.ipxe:
            click.echo(f"  ipxe:   {publication.ipxe}")
        if publication.config_tgz:
            click.echo(f"  config.tgz: {publication.config_tgz}")
        click.echo(f"  config: {publication.config}\n  record: {publication.record}")
        if publication.activated:
            click.echo(
                f"  active: {Path(publication.config).parent}/config"
                + (f" and {publication.active_ipxe}" if publication.active_ipxe else "")
            )
        changes = api.revision_changes(store, name, publication.rid)
        if changes:
            click.echo(f"changes against the previous revision:\n{changes}")


COMMANDS: list[click.Command] = [export]
