"""`stage4 export`: publish a standalone qcow2 into a DNBD3 image store (reference §2.7).

The image is copied under a hidden temporary name (the server skips dot-files), padded with zeros to a
multiple of 4096 (R1), fsync'ed, its `.crc` written beside it, and only then linked to `<name>.r<RID>`
while the store lock is held, so that a server scanning at any moment sees either nothing or the whole
image, and two exports never get the same revision. `os.link` (not rename) makes the final step refuse
to replace an existing file even against writers that ignore the lock (R2). No `.map` or `.meta` is
ever written.

Kernel, initramfs and the stage-3 `config` fragment of the revision are written to a boot directory,
by default the hidden `<store>/.stage4/<name>/`: dnbd3-server scans basePath recursively and would
publish a `kernel.r<RID>` there as an image called `kernel`. The JSON record of the publication always
goes to `<store>/.stage4/<name>/publication.r<RID>.json`.

A store written as `[user@]host:/path` is on another host: every file is uploaded under a hidden temporary
name there (rsync --inplace when both ends have rsync, else scp), and the same commit (lock with flock(1),
pick the revision, link, rename) runs as a POSIX shell script over ssh. ssh reads its usual configuration
(~/.ssh/config: Host aliases, ports, identities); `ssh_options` adds `-o Key=Value` options to every ssh,
scp and rsync call (`stage4 export --ssh-option Port=2222 --ssh-option IdentityFile=~/.ssh/store`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stage4.dnbd3.crc import digest_and_copy
from stage4.dnbd3.protocol import parse_address
from stage4.dnbd3.store import (
    META_DIR,
    TEMP_MARK,
    TEMP_SUFFIX,
    Store,
    fsync_dir,
    parse_rid,
    validate_name,
)
from stage4.errors import InputError, Stage4Error, StepFailed
from stage4.runner import Runner

DEFAULT_IDENTIFIER = "SLX_SYS"
RECORD_FORMAT = "stage4-publication/1"
REMOTE_STORE = re.compile(r"^(?P<host>[^/:\s]+):(?P<path>/.*)$")
# What a remote host and remote paths may contain: no shell, scp or rsync quoting is ever needed.
REMOTE_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]*$")
REMOTE_PATH = re.compile(r"^/[A-Za-z0-9._+@,=~/-]*$")
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*(=|\s+)\S.*$")
RID_PLACEHOLDER = "@RID@"
Fault = Callable[[str], None]


@dataclass(frozen=True)
class Publication:
    """What `publish` wrote. Paths are local paths, or remote paths for a `host:/path` store."""

    store: str
    name: str
    rid: int
    image: str
    crc: str
    size: int
    source_size: int
    sha256: str
    identifier: str
    servers: list[str]
    source_identity: str | None
    kernel: str | None
    initrd: str | None
    config: str
    record: str
    activated: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- inputs -----------------------------------------------------------------------------------------------


def check_servers(servers: Sequence[str]) -> list[str]:
    """Servers for SLX_DNBD3_SERVERS: 'host' or 'host:port' each; space-separated lists are split."""
    result = []
    for item in servers:
        for server in item.split():
            parse_address(server)  # InputError when malformed
            if "'" in server or "\\" in server:
                raise InputError(f"server {server!r}: quotes and backslashes are not allowed")
            result.append(server)
    return result


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


def _inspect(image: Path, identifier: str | None, runner: Runner):
    try:
        from stage4.image.inspect import inspect_image
    except ImportError:
        raise Stage4Error("stage4 inspect is not available in this build yet; cannot check the image "
                          "before export") from None
    report = inspect_image(image, identifier=identifier, runner=runner)
    if not report.passed:
        problems = "; ".join(report.problems()) or "failed checks"
        raise InputError(f"{image} fails `stage4 inspect`: {problems}")
    return report


def read_identity(manifest: Path) -> str | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"manifest {manifest}: cannot read: {exc}") from None
    identity = data.get("identity") if isinstance(data, dict) else None
    return identity if isinstance(identity, str) else None


def guess_identity(image: Path) -> str | None:
    """The build identity from the manifest beside the image (`base.qcow2` -> `base.json`), if any."""
    manifest = image.with_suffix(".json")
    return read_identity(manifest) if manifest.is_file() else None


def config_fragment(servers: list[str], name: str, rid: int | str, identifier: str, comment: str) -> str:
    values = {
        "SLX_DNBD3_SERVERS": " ".join(servers),
        "SLX_DNBD3_IMAGE": name,
        "SLX_DNBD3_RID": str(rid),
        "SLX_SYSTEM_PARTITION_IDENTIFIER": identifier,
    }
    lines = [f"# {comment}"]
    for key, value in values.items():
        if "'" in value:
            raise InputError(f"{key}: {value!r} contains a quote")
        lines.append(f"{key}='{value}'")
    return "\n".join(lines) + "\n"


def _file_facts(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


# --- local files ------------------------------------------------------------------------------------------


class _Temp:
    """A hidden temporary file, flock'ed while we own it (so a crashed export's leftovers can be told
    apart from a running one's), removed unless committed."""

    def __init__(self, directory: Path, stem: str, token: str, kind: str = ""):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f".{stem}{TEMP_MARK}{token}{kind}{TEMP_SUFFIX}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def copy_from(self, source: Path) -> None:
        with source.open("rb") as src:
            size = os.fstat(src.fileno()).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(self.fd, src.fileno(), offset, min(size - offset, 64 << 20))
                if sent == 0:
                    break
                offset += sent
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


def _link_exclusive(source: Path, target: Path, what: str) -> None:
    """Give `source` the name `target`, refusing if `target` exists (hard link; rename as a fallback
    on filesystems without hard links, safe under the store lock)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise InputError(f"{target} exists; {what} is never overwritten (publish a new revision)") from None
    except OSError as exc:
        if exc.errno not in (1, 95, 38):  # EPERM, EOPNOTSUPP, ENOSYS: no hard links here
            raise
        if os.path.lexists(target):
            raise InputError(f"{target} exists; {what} is never overwritten (publish a new revision)") from None
        os.rename(source, target)


def _replace_from_temp(temp: _Temp, target: Path) -> None:
    os.replace(temp.path, target)
    os.close(temp.fd)
    temp.fd = -1


def _write_atomically(target: Path, text: str, token: str) -> None:
    temp = _Temp(target.parent, target.name, token)
    try:
        temp.write(text.encode())
        _replace_from_temp(temp, target)
    finally:
        temp.close()


def reload_server(pidfile: Path) -> int:
    """Send SIGHUP (rescan the image directory) to the server whose pid is in `pidfile`.

    Not SIGUSR1: since 2024 that starts a full CRC pass and does not rescan (reference §2.6, R8).
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise InputError(f"pid file {pidfile}: {exc}") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise Stage4Error(f"server reload: no process {pid} (from {pidfile})") from None
    except PermissionError:
        raise Stage4Error(f"server reload: not allowed to signal process {pid}") from None
    return pid


# --- the export -------------------------------------------------------------------------------------------


def publish(
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
    reload_pidfile: Path | None = None,
    boot_dir: str | Path | None = None,
    activate: bool = False,
    boot_files: bool = True,
    runner: Runner | None = None,
    check_image: bool = True,
    transport: RemoteTransport | None = None,
    ssh_options: Sequence[str] = (),
    _fault: Fault | None = None,
) -> Publication:
    """Publish `image` as the next (or the given) revision of `name` in `store`.

    check_image=False skips `stage4 inspect` (only for tests of the store mechanics); a qcow2 with a
    backing file is refused either way. `ssh_options` ('Key=Value', for a host:/path store) go to ssh, scp
    and rsync as `-o` options. `_fault(stage)` is called at each stage, for crash tests.
    """
    runner = runner or Runner()
    remote = REMOTE_STORE.match(str(store))
    if remote or transport is not None:
        if not remote:
            raise InputError(f"store {store}: a remote store is written host:/absolute/path")
        check_remote(remote["host"], remote["path"], boot_dir)
        ssh_options = check_ssh_options(ssh_options)
    elif ssh_options:
        raise InputError("--ssh-option only applies to a remote store (host:/path)")
    image = Path(image)
    name = validate_name(name)
    wanted_rid = parse_rid(rid) if rid is not None else None
    servers = check_servers(servers)
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    if image.stat().st_size == 0:
        raise InputError(f"{image}: empty file; the DNBD3 server refuses empty images")
    backing = qcow2_backing_file(image)
    if backing is not None:
        raise InputError(f"{image} has a backing file ({backing}); export a standalone qcow2 "
                         "(qemu-img convert -O qcow2 flattens it)")
    if check_image:
        report = _inspect(image, identifier, runner)
        identifier = identifier or report.identifier
    identifier = identifier or DEFAULT_IDENTIFIER
    if source_identity is None:
        source_identity = guess_identity(image)
    for path, what in ((kernel, "kernel"), (initrd, "initrd")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what} {path}: no such file")
    fault = _fault or (lambda _stage: None)
    origins: dict[str, str] = {}

    with contextlib.ExitStack() as stack:
        if boot_files and (kernel is None or initrd is None):
            extracted = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stage4-boot-")))
            try:
                from stage4.image.filesystem import extract_boot_files
            except ImportError:
                raise Stage4Error("extracting kernel and initrd is not available in this build yet; "
                                  "pass --kernel and --initrd, or --no-boot-files") from None
            found_kernel, found_initrd = extract_boot_files(image, extracted, runner, identifier)
            if kernel is None:
                kernel, origins["kernel"] = found_kernel, f"{image.resolve()}: /boot/{found_kernel.name}"
            if initrd is None:
                initrd, origins["initrd"] = found_initrd, f"{image.resolve()}: /boot/{found_initrd.name}"
        if not boot_files:
            kernel = initrd = None
        job = _Job(image, name, wanted_rid, kernel, initrd, servers, identifier, source_identity, activate, fault,
                   origins)
        if remote:
            transport = transport or SshTransport(remote["host"], runner, ssh_options)
            publication = _publish_remote(job, remote["host"], remote["path"], boot_dir, reload_pidfile,
                                          transport, runner)
        else:
            publication = _publish_local(job, Store(Path(store)), Path(boot_dir) if boot_dir else None)
            if reload_pidfile is not None:
                reload_server(Path(reload_pidfile))
    return publication


@dataclass
class _Job:
    image: Path
    name: str
    rid: int | None
    kernel: Path | None
    initrd: Path | None
    servers: list[str]
    identifier: str
    source_identity: str | None
    activate: bool
    fault: Fault
    origins: dict[str, str]

    def origin(self, kind: str, source: Path) -> str:
        return self.origins.get(kind) or str(Path(source).resolve())

    @property
    def leaf(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def record(self, rid: int | str, size: int, source_size: int, sha256: str, crc_sha256: str,
               boot: dict[str, dict]) -> dict:
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "rid": rid,
            "file": f"{self.name}.r{rid}",
            "size": size,
            "sha256": sha256,
            "crc_file": f"{self.name}.r{rid}.crc",
            "crc_sha256": crc_sha256,
            "identifier": self.identifier,
            "servers": self.servers,
            "source": {"image": str(self.image.resolve()), "size": source_size, "identity": self.source_identity},
            "boot_files": boot,
            "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _publish_local(job: _Job, store: Store, boot_dir: Path | None) -> Publication:
    store.check()
    if job.rid is not None and job.rid in store.taken_rids(job.name):
        raise InputError(f"{job.name}: revision {job.rid} exists in {store.root}; it is never overwritten")
    directory = (store.root / job.name).parent
    meta = store.meta_dir(job.name)
    boot = boot_dir or meta
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps: list[_Temp] = []

    def temp(where: Path, stem: str, kind: str = "") -> _Temp:
        # Created and flock'ed under the store lock: another export's cleanup (which runs under that
        # lock) must never find our file in the instant between its creation and its flock.
        with store.lock():
            item = _Temp(where, stem, token, kind)
        temps.append(item)
        return item

    try:
        image_tmp = temp(directory, job.leaf)
        job.fault("copying")
        digest = digest_and_copy(job.image, image_tmp.fd)
        os.fsync(image_tmp.fd)
        job.fault("copied")
        crc_tmp = temp(directory, job.leaf, ".crc")
        crc_tmp.write(digest.crc_file)
        boot_tmps: dict[str, tuple[_Temp, Path]] = {}
        for kind, source in (("kernel", job.kernel), ("initrd", job.initrd)):
            if source is not None:
                item = temp(boot, kind)
                item.copy_from(Path(source))
                boot_tmps[kind] = (item, Path(source))
        job.fault("before-commit")
        with store.lock():
            store.remove_stale_temporaries(directory)
            taken = store.taken_rids(job.name)
            rid = job.rid or store.next_rid(job.name)
            if rid in taken:
                raise InputError(f"{job.name}: revision {rid} exists in {store.root}; it is never overwritten")
            final = directory / f"{job.leaf}.r{rid}"
            crc_final = directory / f"{job.leaf}.r{rid}.crc"
            _link_exclusive(crc_tmp.path, crc_final, "a published .crc")
            try:
                job.fault("crc-linked")
                _link_exclusive(image_tmp.path, final, "a published revision")
            except BaseException:
                with contextlib.suppress(OSError):  # never leave a .crc without its image
                    os.unlink(crc_final)
                raise
            fsync_dir(directory)
        job.fault("committed")
        boot_paths: dict[str, Path] = {}
        boot_facts: dict[str, dict] = {}
        for kind, (item, source) in boot_tmps.items():
            target = boot / f"{kind}.r{rid}"
            _replace_from_temp(item, target)
            boot_paths[kind] = target
            boot_facts[kind] = {"file": target.name, "source": job.origin(kind, source), **_file_facts(target)}
        comment = f"stage4 export of {job.name} revision {rid}, sha256 {digest.sha256}"
        config_text = config_fragment(job.servers, job.name, rid, job.identifier, comment)
        config_path = boot / f"config.r{rid}"
        _write_atomically(config_path, config_text, token)
        if job.activate:
            _write_atomically(boot / "config", config_text, token)
        record = job.record(rid, digest.padded_size, digest.real_size, digest.sha256,
                            hashlib.sha256(digest.crc_file).hexdigest(), boot_facts)
        record_path = meta / f"publication.r{rid}.json"
        _write_atomically(record_path, json.dumps(record, indent=2) + "\n", token)
        fsync_dir(boot)
    finally:
        for item in temps:
            item.close()
    return Publication(
        store=str(store.root), name=job.name, rid=rid, image=str(final), crc=str(crc_final),
        size=digest.padded_size, source_size=digest.real_size, sha256=digest.sha256, identifier=job.identifier,
        servers=job.servers, source_identity=job.source_identity,
        kernel=str(boot_paths["kernel"]) if "kernel" in boot_paths else None,
        initrd=str(boot_paths["initrd"]) if "initrd" in boot_paths else None,
        config=str(config_path), record=str(record_path), activated=job.activate,
        warnings=[] if job.servers else ["no --server given: SLX_DNBD3_SERVERS in the config fragment is empty"],
    )


# --- remote stores over SSH -------------------------------------------------------------------------------


def check_remote(host: str, path: str, boot_dir: str | Path | None) -> None:
    """A remote store's host and paths: plain characters only (they pass through ssh, scp and rsync)."""
    if not REMOTE_HOST.match(host):
        raise InputError(f"store host {host!r}: use letters, digits and . _ - @ (a ~/.ssh/config Host alias "
                         "for anything else)")
    for value, what in ((path, "store path"), (boot_dir, "boot directory")):
        if value is not None and not REMOTE_PATH.match(str(value)):
            raise InputError(f"{what} {str(value)!r} on {host}: must be absolute and use only letters, digits, "
                             "'/' and . _ - + @ , = ~")


def check_ssh_options(options: Sequence[str]) -> list[str]:
    """ssh `-o` options, 'Key=Value' or 'Key Value' each (what ssh_config(5) accepts after -o)."""
    result = []
    for option in options:
        option = option.strip()
        if not SSH_OPTION.match(option) or any(c in option for c in "'\"\\\n"):
            raise InputError(f"ssh option {option!r}: expected Key=Value as in ssh_config(5), e.g. Port=2222 "
                             "(no quotes)")
        result.append(option)
    return result


class RemoteTransport:
    """How to reach a remote store: run a shell script there, copy a file there."""

    def run_script(self, script: str, args: Sequence[str], *, step: str) -> tuple[int, str]:
        raise NotImplementedError

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        raise NotImplementedError

    def remote_tools(self, tools: set[str]) -> None:
        """The tools the store host has (from the prepare script); a transport may pick its copier."""


class SshTransport(RemoteTransport):
    """ssh for commands; rsync (if both ends have it, else scp) for files. BatchMode: never waits for a
    password prompt. Files are written straight to their hidden temporary names (rsync --inplace), so an
    interrupted copy leaves nothing that dnbd3-server would scan."""

    def __init__(self, host: str, runner: Runner, options: Sequence[str] = (), *, use_rsync: bool | None = None):
        self.host, self.runner = host, runner
        self.options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        for option in check_ssh_options(options):
            self.options += ["-o", option]
        self.use_rsync = use_rsync  # None: when both ends have it
        self.copier = "scp"

    def run_script(self, script: str, args: Sequence[str], *, step: str) -> tuple[int, str]:
        command = "sh -s -- " + " ".join(shlex.quote(a) for a in args)
        result = self.runner.run(["ssh", *self.options, "--", self.host, command], step=step,
                                 input=script.encode(), capture=True, check=False)
        if result.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise StepFailed(step, f"ssh to {self.host} failed (exit 255; see the log for ssh's message)",
                             self.runner.log_path)
        return result.returncode, result.stdout

    def remote_tools(self, tools: set[str]) -> None:
        local = shutil.which("rsync") is not None
        wanted = self.use_rsync if self.use_rsync is not None else True
        if self.use_rsync and not (local and "rsync" in tools):
            raise Stage4Error(f"rsync is needed on this host and on {self.host} for this export")
        self.copier = "rsync" if wanted and local and "rsync" in tools else "scp"

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        if self.copier == "rsync":
            shell = shlex.join(["ssh", *self.options])
            argv = ["rsync", "--inplace", "--whole-file", "--chmod=F644", "-e", shell, "--", local,
                    f"{self.host}:{remote}"]
        else:
            argv = ["scp", "-q", *self.options, "--", local, f"{self.host}:{remote}"]
        self.runner.run(argv, step=step)


class LocalShellTransport(RemoteTransport):
    """Runs the remote scripts with the local /bin/sh and copies with cp: a 'remote' store on this host.

    Exercises exactly the scripts an SSH store runs; used by the tests and for stores whose server
    reads a directory that only a shell on this machine can write (e.g. another user's, via sudo).
    """

    def __init__(self, runner: Runner):
        self.runner = runner

    def run_script(self, script: str, args: Sequence[str], *, step: str) -> tuple[int, str]:
        result = self.runner.run(["sh", "-s", "--", *args], step=step, input=script.encode(), capture=True,
                                 check=False)
        return result.returncode, result.stdout

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        self.runner.run(["cp", "--", local, remote], step=step)


# Exit codes of the remote script.
_R_TAKEN, _R_FULL, _R_NO_FLOCK, _R_NO_STORE, _R_SIZE = 3, 4, 5, 6, 7

_REMOTE_PREPARE = r"""
set -eu
store=$1 dir=$2 boot=$3 meta=$4
[ -d "$store" ] || { echo "store $store: not a directory" >&2; exit 6; }
command -v flock >/dev/null 2>&1 || { echo "flock(1) is missing on the store host" >&2; exit 5; }
mkdir -p -- "$store/$dir" "$boot" "$meta"
tools=
for tool in rsync; do command -v "$tool" >/dev/null 2>&1 && tools="$tools $tool"; done
echo "TOOLS=$tools"
"""

_REMOTE_COMMIT = r"""
set -eu
store=$1 dir=$2 leaf=$3 token=$4 rid=$5 padded=$6 boot=$7 meta=$8 activate=$9
shift 9
pidfile=${1:-}
cd -- "$store/$dir"
tmp=".$leaf.stage4-$token.part"
crctmp=".$leaf.stage4-$token.crc.part"
truncate -s "$padded" -- "$tmp"
[ "$(stat -c %s -- "$tmp")" = "$padded" ] || { echo "uploaded image has the wrong size" >&2; exit 7; }
chmod 644 -- "$tmp" "$crctmp"
sync -- "$tmp" "$crctmp" 2>/dev/null || sync
command -v flock >/dev/null 2>&1 || { echo "flock(1) is missing on the store host" >&2; exit 5; }
exec 9>>"$store/.stage4.lock"
flock 9
find . -maxdepth 1 -name ".$leaf.stage4-*.part" -mmin +1440 -exec rm -f -- {} + 2>/dev/null || true
taken=" " max=0
for f in ./"$leaf".r*; do
    [ -e "$f" ] || continue
    r=${f#./"$leaf".r}
    r=${r%.crc}
    case $r in ''|*[!0-9]*) continue ;; esac
    r=$(expr "$r" + 0)
    taken="$taken$r "
    [ "$r" -gt "$max" ] && max=$r
done
if [ "$rid" = 0 ]; then
    rid=$((max + 1))
    [ "$rid" -le 65535 ] || { echo "no revision above $max left" >&2; exit 4; }
else
    case $taken in *" $rid "*) echo "revision $rid exists" >&2; exit 3 ;; esac
fi
ln -- "$crctmp" "$leaf.r$rid.crc" || exit 3
ln -- "$tmp" "$leaf.r$rid" || exit 3
rm -f -- "$tmp" "$crctmp"
sync
flock -u 9
for kind in kernel initrd; do
    t="$boot/.$kind.stage4-$token.part"
    if [ -e "$t" ]; then chmod 644 -- "$t"; mv -f -- "$t" "$boot/$kind.r$rid"; fi
done
sed "s/@RID@/$rid/g" "$boot/.config.stage4-$token.part" > "$boot/.config.stage4-$token.tmp.part"
rm -f -- "$boot/.config.stage4-$token.part"
if [ "$activate" = 1 ]; then cp -- "$boot/.config.stage4-$token.tmp.part" "$boot/.config.stage4-$token.act.part"; fi
mv -f -- "$boot/.config.stage4-$token.tmp.part" "$boot/config.r$rid"
if [ "$activate" = 1 ]; then mv -f -- "$boot/.config.stage4-$token.act.part" "$boot/config"; fi
sed "s/@RID@/$rid/g" "$meta/.publication.stage4-$token.part" > "$meta/.publication.stage4-$token.tmp.part"
rm -f -- "$meta/.publication.stage4-$token.part"
mv -f -- "$meta/.publication.stage4-$token.tmp.part" "$meta/publication.r$rid.json"
sync
if [ -n "$pidfile" ]; then kill -HUP "$(cat -- "$pidfile")"; fi
echo "RID=$rid"
"""

_REMOTE_CLEANUP = r"""
store=$1 dir=$2 leaf=$3 token=$4 boot=$5 meta=$6
rm -f -- "$store/$dir/.$leaf.stage4-$token.part" "$store/$dir/.$leaf.stage4-$token.crc.part" \
    "$boot/.kernel.stage4-$token.part" "$boot/.initrd.stage4-$token.part" "$boot/.config.stage4-$token.part" \
    "$meta/.publication.stage4-$token.part"
"""


def _publish_remote(job: _Job, host: str, root: str, boot_dir: str | Path | None, pidfile: Path | None,
                    transport: RemoteTransport, runner: Runner) -> Publication:
    root = root.rstrip("/") or "/"
    directory = str(Path(job.name).parent)
    meta = f"{root}/{META_DIR}/{job.name}"
    boot = str(boot_dir) if boot_dir else meta
    if not boot.startswith("/"):
        raise InputError(f"boot directory {boot}: must be an absolute path on {host}")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    where = f"{host}:{root}"
    code, out = transport.run_script(_REMOTE_PREPARE, [root, directory, boot, meta], step=f"prepare store {where}")
    if code == _R_NO_STORE:
        raise InputError(f"store {where}: not a directory")
    if code == _R_NO_FLOCK:
        raise Stage4Error(f"{where}: flock(1) (util-linux) is needed on the store host")
    tools = re.search(r"^TOOLS=(.*)$", out, re.MULTILINE)
    if code or not tools:
        raise StepFailed(f"prepare store {where}", f"remote script exited with {code}", runner.log_path)
    transport.remote_tools(set(tools[1].split()))
    digest = digest_and_copy(job.image)
    image_dir = f"{root}/{directory}".replace("/./", "/").rstrip("/") if directory != "." else root
    committed = False
    try:
        with tempfile.TemporaryDirectory(prefix="stage4-export-") as tmp:
            local = Path(tmp)
            transport.upload(job.image, f"{image_dir}/.{job.leaf}{TEMP_MARK}{token}{TEMP_SUFFIX}",
                             step=f"upload image to {where}")
            (local / "crc").write_bytes(digest.crc_file)
            transport.upload(local / "crc", f"{image_dir}/.{job.leaf}{TEMP_MARK}{token}.crc{TEMP_SUFFIX}",
                             step="upload .crc")
            boot_facts: dict[str, dict] = {}
            for kind, source in (("kernel", job.kernel), ("initrd", job.initrd)):
                if source is not None:
                    transport.upload(Path(source), f"{boot}/.{kind}{TEMP_MARK}{token}{TEMP_SUFFIX}",
                                     step=f"upload {kind}")
                    boot_facts[kind] = {"file": f"{kind}.r{RID_PLACEHOLDER}", "source": job.origin(kind, source),
                                        **_file_facts(Path(source))}
            comment = f"stage4 export of {job.name} revision {RID_PLACEHOLDER}, sha256 {digest.sha256}"
            (local / "config").write_text(config_fragment(job.servers, job.name, RID_PLACEHOLDER, job.identifier,
                                                          comment))
            transport.upload(local / "config", f"{boot}/.config{TEMP_MARK}{token}{TEMP_SUFFIX}", step="upload config")
            record = job.record(RID_PLACEHOLDER, digest.padded_size, digest.real_size, digest.sha256,
                                hashlib.sha256(digest.crc_file).hexdigest(), boot_facts)
            text = json.dumps(record, indent=2).replace(f'"rid": "{RID_PLACEHOLDER}"', f'"rid": {RID_PLACEHOLDER}')
            (local / "record").write_text(text + "\n")
            transport.upload(local / "record", f"{meta}/.publication{TEMP_MARK}{token}{TEMP_SUFFIX}",
                             step="upload record")
        job.fault("before-commit")
        args = [root, directory, job.leaf, token, str(job.rid or 0), str(digest.padded_size), boot, meta,
                "1" if job.activate else "0", str(pidfile or "")]
        code, out = transport.run_script(_REMOTE_COMMIT, args, step=f"publish on {where}")
        if code == _R_TAKEN:
            raise InputError(f"{job.name}: revision {job.rid} exists in {where}; it is never overwritten")
        if code == _R_FULL:
            raise Stage4Error(f"{job.name}: revision 65535 is taken in {where}; prune, then use --rid")
        if code == _R_NO_FLOCK:
            raise Stage4Error(f"{where}: flock(1) (util-linux) is needed on the store host")
        match = re.search(r"^RID=(\d+)$", out, re.MULTILINE)
        if code or not match:
            raise StepFailed(f"publish on {where}", f"remote script exited with {code}", runner.log_path)
        committed = True
        rid = int(match[1])
    finally:
        if not committed:  # best effort: the original error is the one to report
            with contextlib.suppress(Stage4Error):
                transport.run_script(_REMOTE_CLEANUP, [root, directory, job.leaf, token, boot, meta],
                                     step=f"clean up {where}")
    final = f"{image_dir}/{job.leaf}.r{rid}"
    return Publication(
        store=where, name=job.name, rid=rid, image=f"{host}:{final}", crc=f"{host}:{final}.crc",
        size=digest.padded_size, source_size=digest.real_size, sha256=digest.sha256, identifier=job.identifier,
        servers=job.servers, source_identity=job.source_identity,
        kernel=f"{host}:{boot}/kernel.r{rid}" if job.kernel else None,
        initrd=f"{host}:{boot}/initrd.r{rid}" if job.initrd else None,
        config=f"{host}:{boot}/config.r{rid}", record=f"{host}:{meta}/publication.r{rid}.json",
        activated=job.activate,
        warnings=[] if job.servers else ["no --server given: SLX_DNBD3_SERVERS in the config fragment is empty"],
    )


# --- listing and pruning ----------------------------------------------------------------------------------


def prune(store: Path, name: str, keep: int, protect: Sequence[int] = (), *, dry_run: bool = False,
          pidfile: Path | None = None) -> list[int]:
    """Remove all but the newest `keep` revisions of `name` (never the newest, never a protected one).

    Removal follows §2.4: the image first, then its .crc, boot files and record; send SIGHUP afterwards
    (pidfile) so the server drops them. Clients still using a removed revision keep reading it until then.
    """
    if keep < 1:
        raise InputError("--keep must be at least 1 (the newest revision is never removed)")
    local = Store(Path(store))
    local.check()
    protected = {parse_rid(r) for r in protect}
    revisions = local.revisions(name)
    removable = [r for r in revisions[:-keep] if r.rid not in protected] if len(revisions) > keep else []
    if dry_run:
        return [r.rid for r in removable]
    meta = local.meta_dir(name)
    removed = []
    with local.lock():
        for revision in removable:
            os.unlink(revision.path)
            for side in (revision.crc_path, meta / f"kernel.r{revision.rid}", meta / f"initrd.r{revision.rid}",
                         meta / f"config.r{revision.rid}", meta / f"publication.r{revision.rid}.json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(side)
            removed.append(revision.rid)
        if removed:
            fsync_dir(revision.path.parent)
    if removed and pidfile is not None:
        reload_server(pidfile)
    return removed


def read_record(store: Path, name: str, rid: int) -> dict | None:
    path = Store(Path(store)).meta_dir(name) / f"publication.r{rid}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
