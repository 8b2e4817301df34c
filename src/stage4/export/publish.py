"""`stage4 export`: publish a standalone qcow2 into a DNBD3 image store (docs/dnbd3-store.md).

`publish` checks everything it can before it writes anything (name, revision, servers, the image, its
manifest and the dracut modules of the initramfs it names, the boot directory, a writable store, the
server's pid file), then hands the job to the local (local.py) or remote (remote.py) transaction: all files
under hidden temporary names first, the image `<name>.r<RID>` linked last under the store lock, the
revision withdrawn again if anything after that fails. No `.map` or `.meta` is ever written.

Kernel, initramfs, the stage-3 `config.r<RID>` and the iPXE entry `ipxe.r<RID>` go to a boot directory, by
default the hidden `<store>/.stage4/<name>/`: dnbd3-server scans basePath recursively and would load a
visible `kernel.r<RID>` as an image called `kernel`. The record goes to `<store>/.stage4/<name>/`.
Activation replaces `<boot-dir>/ipxe` (the entry that follows the active revision) and `<boot-dir>/config`.

An image built in layers has a manifest beside it (`prod.qcow2` -> `prod.json`) naming the kernel and the
initramfs the dev run built, the root partition identifier and the configured dracut modules: exactly
those files are published (not the ones in the image's /boot). Without such a manifest (a base image, or
--kernel/--initrd given) the kernel and initramfs come from the options or out of the image.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict, Unpack

from stage4.dnbd3.protocol import parse_address
from stage4.dnbd3.store import Store, parse_rid, validate_name
from stage4.errors import InputError
from stage4.export import build_facts, revisions
from stage4.export.job import Job, Publication
from stage4.export.local import publish_local
from stage4.export.reload import server_pid
from stage4.export.remote import (
    REMOTE_STORE,
    RemoteExport,
    RemoteTransport,
    SshTransport,
    check_remote,
    check_ssh_options,
)
from stage4.runner import Runner

__all__ = ["Export", "Publication", "prepare", "publish"]

DEFAULT_IDENTIFIER = "SLX_SYS"
SERVER_CHARS = re.compile(r"^[A-Za-z0-9._:\[\]%-]+$")


def check_servers(servers: Sequence[str]) -> list[str]:
    """Servers for SLX_DNBD3_SERVERS: 'host' or 'host:port' each; space-separated lists are split."""
    result = []
    for item in servers:
        if not item.strip():
            raise InputError(f"--server {item!r}: empty; give a host or host:port")
        for server in item.split():
            if not SERVER_CHARS.match(server):
                raise InputError(
                    f"--server {server!r}: use a host name or address with an optional :port "
                    "(letters, digits and . - : [ ])"
                )
            parse_address(server)  # InputError when malformed
            result.append(server)
    return result


def check_boot_dir(store: str, boot_dir: str | None, *, resolve: bool = True) -> None:
    """A boot directory inside the store must be hidden from the server's scan (a dot-directory below the
    store): dnbd3-server loads every visible `<x>.r<N>` file in the store as an image."""
    if boot_dir is None:
        return
    real = os.path.realpath if resolve else os.path.normpath
    root, boot = real(store), real(boot_dir)
    relative = os.path.relpath(boot, root)
    if relative == ".." or relative.startswith("../"):
        return
    parts = [] if relative == "." else relative.split("/")
    if not any(part.startswith(".") for part in parts):
        raise InputError(
            f"boot directory {boot_dir} is inside the store {store} and visible to "
            "dnbd3-server, which scans the store and would load kernel.r<RID>, initrd.r<RID> "
            "and config.r<RID> as images; use a hidden directory below the store "
            f"(e.g. {root}/.boot) or one outside it"
        )


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file named in a qcow2 header ('' if it cannot be read), None if there is none."""
    with path.open("rb") as handle:
        header = handle.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            return None
        offset, size = struct.unpack_from(">QI", header, 8)
        if not offset or not size:
            return None
        handle.seek(offset)
        return handle.read(min(size, 1023)).decode(errors="replace")


def check_image_file(image: Path) -> None:
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    if image.stat().st_size == 0:
        raise InputError(f"{image}: empty file; the DNBD3 server refuses empty images")
    backing = qcow2_backing_file(image)
    if backing is not None:
        raise InputError(
            f"{image} has a backing file ({backing}); export a standalone qcow2 "
            "(qemu-img convert -O qcow2 flattens it)"
        )


def check_config_tgz(path: Path) -> Path:
    """--config-tgz: a gzip'ed tar whose members all stay below the root they are unpacked in (what stage 3
    checks again before it unpacks it into a client's /)."""
    if not path.is_file():
        raise InputError(f"--config-tgz {path}: no such file")
    try:
        with tarfile.open(path, "r:gz") as archive:
            names = archive.getnames()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"--config-tgz {path}: not a gzip'ed tar archive ({exc})") from None
    for member in names:
        if member.startswith("/") or ".." in member.split("/"):
            raise InputError(f"--config-tgz {path}: member {member!r} is outside the root it is unpacked in")
    return path


def check_writable(path: Path, what: str) -> None:
    """`path`, or the directory it will be created in, must be writable."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise InputError(f"{what} {path}: " + ("read-only file system" if read_only else "not writable"))


def inspected_identifier(image: Path, identifier: str | None, runner: Runner) -> str:
    """Check the image with `stage4 inspect` (the one read of its partitions and /boot)."""
    from stage4.image.inspect import inspect_image

    report = inspect_image(image, identifier=identifier, runner=runner)
    if not report.passed:
        problems = "; ".join(report.problems()) or "failed checks"
        raise InputError(f"{image} fails `stage4 inspect`: {problems}")
    return report.identifier


@dataclass
class Export:
    """A checked export, ready to run: nothing has been written yet."""

    job: Job
    store: str
    boot_dir: str | None
    extract: bool  # take the kernel and initramfs out of the image
    runner: Runner
    transport: RemoteTransport | None = None
    ssh_options: Sequence[str] = ()

    def run(self) -> Publication:
        job = self.job
        with contextlib.ExitStack() as stack:
            if self.extract:
                from stage4.image.filesystem import extract_boot_files

                extracted = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stage4-boot-")))
                kernel, initrd = extract_boot_files(job.image, extracted, self.runner, job.identifier)
                origin = f"{job.image.resolve()}: /boot/"
                warnings = list(job.warnings)
                if not job.initrd and (
                    warning := build_facts.stage3_warning(initrd, origin + initrd.name, self.runner)
                ):
                    warnings.append(warning)
                job = replace(
                    job,
                    kernel=job.kernel or kernel,
                    initrd=job.initrd or initrd,
                    origins={
                        **({} if job.kernel else {"kernel": origin + kernel.name}),
                        **({} if job.initrd else {"initrd": origin + initrd.name}),
                    },
                    warnings=warnings,
                )
            remote = REMOTE_STORE.match(self.store)
            if remote:
                transport = self.transport or SshTransport(remote["host"], self.runner, self.ssh_options)
                return RemoteExport(
                    job, remote["host"], remote["path"], self.boot_dir, transport, self.runner
                ).run()
            return publish_local(job, Store(Path(self.store)), Path(self.boot_dir) if self.boot_dir else None)


def prepare(
    image: Path,
    store: str | Path,
    name: str,
    *,
    rid: int | str | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    servers: Sequence[str] = (),
    identifier: str | None = None,
    source_identity: str | None = None,
    manifest: Path | None = None,
    reload_pidfile: Path | None = None,
    boot_dir: str | Path | None = None,
    activate: bool = False,
    boot_files: bool = True,
    runner: Runner | None = None,
    check_image: bool = True,
    transport: RemoteTransport | None = None,
    ssh_options: Sequence[str] = (),
    config_tgz: Path | None = None,
) -> Export:
    """Check everything about an export that can be checked without writing; InputError (one line) if
    something is wrong. See `publish` for the arguments."""
    runner = runner or Runner()
    store = str(store)
    boot_dir = str(boot_dir) if boot_dir else None
    remote = REMOTE_STORE.match(store)
    if transport is not None and not remote:
        raise InputError(f"store {store}: a remote store is written host:/absolute/path")
    if remote:
        check_remote(remote["host"], remote["path"], boot_dir)
        ssh_options = check_ssh_options(ssh_options)
    elif ssh_options:
        raise InputError("--ssh-option only applies to a remote store (host:/path)")
    name = validate_name(name)
    wanted_rid = parse_rid(rid) if rid is not None else None
    servers = check_servers(servers)
    if not boot_files and (kernel or initrd):
        raise InputError("--no-boot-files cannot be combined with --kernel/--initrd")
    for path, what in ((kernel, "kernel"), (initrd, "initrd")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what} {path}: no such file")
    if config_tgz is not None:
        config_tgz = check_config_tgz(Path(config_tgz))
    image = Path(image)
    check_image_file(image)
    if remote:
        check_boot_dir(remote["path"], boot_dir, resolve=False)
    else:
        local = Store(Path(store))
        local.check()
        check_boot_dir(str(local.root), boot_dir)
        check_writable(local.root, "store")
        boot_dirs = [Path(boot_dir)] if boot_dir else []
        if wanted_rid is not None and wanted_rid in revisions.taken_rids(local, name, boot_dirs):
            raise InputError(f"{name}: revision {wanted_rid} exists in {store}; it is never overwritten")
        if boot_dir:
            check_writable(Path(boot_dir), "boot directory")
        if reload_pidfile is not None:
            server_pid(Path(reload_pidfile))

    manifest_path = Path(manifest) if manifest else build_facts.manifest_beside(image)
    build = build_facts.read(manifest_path, image) if manifest_path else None
    if build is not None:
        source_identity = source_identity or build.identity
        identifier = identifier or build.identifier
    dracut_modules: tuple[str, ...] = ()
    if boot_files and kernel is None and initrd is None and build is not None and build.has_boot_files:
        assert build.initramfs is not None  # build_facts.read sets kernel and initramfs together
        kernel, initrd, dracut_modules = build.kernel, build.initramfs, build.dracut_modules
        build_facts.check_dracut_modules(initrd, dracut_modules, runner)
    if check_image:
        identifier = inspected_identifier(image, identifier, runner)
    job = Job(
        image,
        name,
        wanted_rid,
        Path(kernel) if kernel else None,
        Path(initrd) if initrd else None,
        servers,
        identifier or DEFAULT_IDENTIFIER,
        source_identity,
        activate,
        Path(reload_pidfile) if reload_pidfile else None,
        build.path if build else None,
        dracut_modules,
        config_tgz=config_tgz,
    )
    extract = boot_files and (kernel is None or initrd is None)
    return Export(job, store, boot_dir, extract, runner, transport, ssh_options)


class PrepareOptions(TypedDict, total=False):
    """The keyword arguments of `prepare` but its runner (what `publish` and `api.export` pass on)."""

    rid: int | str | None
    kernel: Path | None
    initrd: Path | None
    servers: Sequence[str]
    identifier: str | None
    source_identity: str | None
    manifest: Path | None
    reload_pidfile: Path | None
    boot_dir: str | Path | None
    activate: bool
    boot_files: bool
    check_image: bool
    transport: RemoteTransport | None
    ssh_options: Sequence[str]
    config_tgz: Path | None


def publish(
    image: Path, store: str | Path, name: str, runner: Runner | None = None, **options: Unpack[PrepareOptions]
) -> Publication:
    """Publish `image` as the next (or the given) revision of `name` in `store`.

    Options (all keywords): rid, kernel, initrd, servers, identifier, source_identity, manifest (default:
    the .json beside the image), reload_pidfile, boot_dir, activate, boot_files, runner, check_image
    (False skips `stage4 inspect`, only for tests of the store mechanics; a qcow2 with a backing file is
    refused either way), transport, ssh_options ('Key=Value' for a host:/path store, given to ssh, scp and
    rsync as `-o` options), config_tgz (the site's config.tgz: published as config.tgz.r<RID>, named by
    SLX_CONFIG_NAME in the revision's config).
    """
    return prepare(image, store, name, runner=runner, **options).run()
