"""Publishing into a store on another host over SSH.

A store written as `[user@]host:/path` is on another host: every file is uploaded under a hidden temporary
name there (rsync --inplace when both ends have rsync, else scp), and the commit (lock with flock(1), pick
the revision, link the files into place with the image last, withdraw on a later failure) runs as the shell
script remote_commit.sh over ssh. ssh reads its usual configuration (~/.ssh/config: Host aliases, ports,
identities); `ssh_options` adds `-o Key=Value` options to every ssh, scp and rsync call.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from stage4.dnbd3.crc import digest_and_copy
from stage4.dnbd3.store import META_DIR, TEMP_MARK, TEMP_SUFFIX
from stage4.errors import InputError, Stage4Error, StepFailed
from stage4.export.job import Job, Publication, amended
from stage4.export.records import recorded_boot_dir
from stage4.runner import Runner

REMOTE_STORE = re.compile(r"^(?P<host>[^/:\s]+):(?P<path>/.*)$")
# What a remote host and remote paths may contain: no shell, scp or rsync quoting is ever needed.
REMOTE_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]*$")
REMOTE_PATH = re.compile(r"^/[A-Za-z0-9._+@,=~/-]*$")
SSH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9]*(=|\s+)\S.*$")
RID_PLACEHOLDER = "@RID@"

# Exit codes of remote_commit.sh.
_TAKEN, _FULL, _NO_FLOCK, _NO_STORE, _SIZE, _WRITE, _WITHDRAWN, _READ_ONLY, _PIDFILE = range(3, 12)


def script() -> str:
    return resources.files("stage4.export").joinpath("remote_commit.sh").read_text(encoding="utf-8")


def check_remote(host: str, path: str, boot_dir: str | Path | None) -> None:
    """A remote store's host and paths: plain characters only (they pass through ssh, scp and rsync)."""
    if not REMOTE_HOST.match(host):
        raise InputError(
            f"store host {host!r}: use letters, digits and . _ - @ (a ~/.ssh/config Host alias "
            "for anything else)"
        )
    for value, what in ((path, "store path"), (boot_dir, "boot directory")):
        if value is not None and not REMOTE_PATH.match(str(value)):
            raise InputError(
                f"{what} {str(value)!r} on {host}: must be absolute and use only letters, "
                "digits, '/' and . _ - + @ , = ~"
            )


def check_ssh_options(options: Sequence[str]) -> list[str]:
    """ssh `-o` options, 'Key=Value' or 'Key Value' each (what ssh_config(5) accepts after -o)."""
    result = []
    for option in options:
        option = option.strip()
        if not SSH_OPTION.match(option) or any(c in option for c in "'\"\\\n"):
            raise InputError(
                f"ssh option {option!r}: expected Key=Value as in ssh_config(5), e.g. Port=2222 (no quotes)"
            )
        result.append(option)
    return result


class RemoteTransport:
    """How to reach a remote store: run a shell script there, copy a file there."""

    def run_script(self, script: str, args: Sequence[str], *, step: str) -> tuple[int, str]:
        raise NotImplementedError

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        raise NotImplementedError

    def remote_tools(self, tools: set[str]) -> None:
        """The tools the store host has (from the prepare step); a transport may pick its copier."""


class SshTransport(RemoteTransport):
    """ssh for commands; rsync (if both ends have it, else scp) for files. BatchMode: never waits for a
    password prompt. Files are written straight to their hidden temporary names (rsync --inplace), so an
    interrupted copy leaves nothing that dnbd3-server would scan."""

    def __init__(
        self, host: str, runner: Runner, options: Sequence[str] = (), *, use_rsync: bool | None = None
    ):
        self.host, self.runner = host, runner
        self.options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        for option in check_ssh_options(options):
            self.options += ["-o", option]
        self.use_rsync = use_rsync  # None: when both ends have it
        self.copier = "scp"

    def run_script(self, script: str, args: Sequence[str], *, step: str) -> tuple[int, str]:
        command = "sh -s -- " + " ".join(shlex.quote(a) for a in args)
        result = self.runner.run(
            ["ssh", *self.options, "--", self.host, command],
            step=step,
            input=script.encode(),
            capture=True,
            check=False,
        )
        if result.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise StepFailed(
                step,
                f"ssh to {self.host} failed (exit 255; see the log for ssh's message)",
                self.runner.log_path,
            )
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
            argv: list[str | Path] = [
                "rsync",
                "--inplace",
                "--whole-file",
                "--chmod=F644",
                "-e",
                shell,
                "--",
                local,
                f"{self.host}:{remote}",
            ]
        else:
            argv = ["scp", "-q", *self.options, "--", local, f"{self.host}:{remote}"]
        self.runner.run(argv, step=step)


def _error(code: int, out: str, where: str, step: str, runner: Runner) -> Stage4Error:
    """The one-line error for a failed remote_commit.sh run."""
    found = re.search(r"^ERROR=(.*)$", out, re.MULTILINE)
    message = found[1] if found else f"remote script exited with {code}"
    if code in (_NO_STORE, _READ_ONLY, _PIDFILE, _TAKEN):
        return InputError(f"{where}: {message}")
    if code == _WITHDRAWN:
        return Stage4Error(f"{where}: {message}; the revision was withdrawn")
    if code in (_NO_FLOCK, _FULL, _WRITE, _SIZE):
        return Stage4Error(f"{where}: {message}")
    return StepFailed(step, message, runner.log_path)


class RemoteExport:
    """One export into a store on `host`: prepare, upload, commit (or clean up)."""

    def __init__(
        self,
        job: Job,
        host: str,
        root: str,
        boot_dir: str | Path | None,
        transport: RemoteTransport,
        runner: Runner,
    ):
        self.job, self.host, self.transport, self.runner = job, host, transport, runner
        self.root = root.rstrip("/") or "/"
        self.directory = str(Path(job.name).parent)
        self.meta = f"{self.root}/{META_DIR}/{job.name}"
        self.boot = str(boot_dir) if boot_dir else self.meta
        self.where = f"{host}:{self.root}"
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.image_dir = posixpath.normpath(f"{self.root}/{self.directory}")

    def call(self, args: list[str], step: str) -> str:
        code, out = self.transport.run_script(script(), args, step=step)
        if code:
            raise _error(code, out, self.where, step, self.runner)
        return out

    def temp(self, directory: str, stem: str, kind: str = "") -> str:
        return f"{directory}/.{stem}{TEMP_MARK}{self.token}{kind}{TEMP_SUFFIX}"

    def run(self) -> Publication:
        job = self.job
        pidfile = str(job.reload_pidfile or "")
        out = self.call(
            ["prepare", self.root, self.directory, self.boot, self.meta, pidfile],
            f"prepare store {self.where}",
        )
        tools = re.search(r"^TOOLS=(.*)$", out, re.MULTILINE)
        if not tools:
            raise StepFailed(
                f"prepare store {self.where}", "no tool list from the store host", self.runner.log_path
            )
        self.transport.remote_tools(set(tools[1].split()))
        digest = digest_and_copy(job.image)
        committed = False
        try:
            with tempfile.TemporaryDirectory(prefix="stage4-export-") as tmp:
                local = Path(tmp)
                self.transport.upload(
                    job.image, self.temp(self.image_dir, job.leaf), step=f"upload image to {self.where}"
                )
                (local / "crc").write_bytes(digest.crc_file)
                self.transport.upload(
                    local / "crc", self.temp(self.image_dir, job.leaf, ".crc"), step="upload .crc"
                )
                for kind, source in job.boot_sources.items():
                    self.transport.upload(source, self.temp(self.boot, kind), step=f"upload {kind}")
                boot = recorded_boot_dir(posixpath.normpath(self.root), posixpath.normpath(self.boot))
                texts = job.texts(RID_PLACEHOLDER, digest, boot)
                texts["record"] = texts["record"].replace(
                    f'"rid": "{RID_PLACEHOLDER}"', f'"rid": {RID_PLACEHOLDER}'
                )
                for kind, text in texts.items():
                    (local / kind).write_text(text)
                    directory, stem = (self.meta, "publication") if kind == "record" else (self.boot, kind)
                    self.transport.upload(local / kind, self.temp(directory, stem), step=f"upload {kind}")
            args = [
                "commit",
                self.root,
                self.directory,
                job.leaf,
                self.token,
                str(job.rid or 0),
                str(digest.padded_size),
                self.boot,
                self.meta,
                "1" if job.activate else "0",
                pidfile,
            ]
            out = self.call(args, f"publish on {self.where}")
            match = re.search(r"^RID=(\d+)$", out, re.MULTILINE)
            if not match:
                raise StepFailed(
                    f"publish on {self.where}", "no revision from the store host", self.runner.log_path
                )
            committed = True
        except Stage4Error as exc:
            raise amended(exc, "nothing published") from None
        finally:
            if not committed:  # best effort: the original error is the one to report
                with contextlib.suppress(Stage4Error):
                    args = ["cleanup", self.root, self.directory, job.leaf, self.token, self.boot, self.meta]
                    self.transport.run_script(script(), args, step=f"clean up {self.where}")
        rid = int(match[1])
        prefix = f"{self.host}:"
        return job.publication(
            self.where,
            rid,
            digest,
            f"{prefix}{self.image_dir}/{job.leaf}.r{rid}",
            f"{prefix}{self.boot}",
            f"{prefix}{self.meta}",
        )
