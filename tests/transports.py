"""A store host reached without ssh, for the tests of remote stores: the script an SSH store runs is run
by the local /bin/sh, and uploads are copies."""

from __future__ import annotations

import subprocess
from pathlib import Path

from stage4.export.remote import RemoteTransport
from stage4.runner import Runner


class LocalShellTransport(RemoteTransport):
    """Runs the store host's script with the local /bin/sh and copies with cp: a 'remote' store on this host,
    so that the script an SSH store runs is exercised without ssh."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def run_script(self, script: str, args, *, step: str) -> tuple[int, str]:
        result = self.runner.run(
            ["sh", "-s", "--", *args], step=step, input=script.encode(), capture=True, check=False
        )
        return result.returncode, result.stdout

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        self.runner.run(["cp", "--", local, remote], step=step)


class DyingServerTransport(LocalShellTransport):
    """The store host's script run locally; the server dies while the files are uploaded (after the
    script's own check of the pid file)."""

    def __init__(self, runner: Runner, server: subprocess.Popen):
        super().__init__(runner)
        self.server = server

    def upload(self, local: Path, remote: str, *, step: str) -> None:
        if self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        super().upload(local, remote, step=step)
