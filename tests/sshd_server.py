"""A private sshd on 127.0.0.1 for tests of remote stores: its own random port, host key, client key,
authorized_keys and pid file, all in a tmp directory; no system service is used or changed.

Use the `sshd` fixture (module scope): it yields host ('root@127.0.0.1'), port, dir and the ssh options
(port, identity, known_hosts with the generated host key) that `--ssh-option` takes. On teardown the
server is stopped, and no sshd session or ssh/scp/rsync client started with these keys may be left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

SSHD = "/usr/sbin/sshd"


def children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    for tool in (SSHD, "ssh", "scp", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install openssh-server rsync)")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation directory, login as root)")
    tmp = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", tmp / key], check=True
        )
    shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        Port {port}
        HostKey {tmp}/host_key
        AuthorizedKeysFile {tmp}/authorized_keys
        PidFile {tmp}/sshd.pid
        StrictModes no
        UsePAM no
        PermitRootLogin prohibit-password
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        MaxStartups 50
        LogLevel VERBOSE
        Subsystem sftp internal-sftp
        """)
    )
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} " + (tmp / "host_key.pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = (tmp / "sshd.log").open("wb")
    server = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", config],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, (tmp / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.05)
        options = [
            f"Port={port}",
            f"IdentityFile={tmp}/client_key",
            "IdentitiesOnly=yes",
            f"UserKnownHostsFile={tmp}/known_hosts",
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
        ]
        yield SimpleNamespace(port=port, options=options, dir=tmp, host="root@127.0.0.1")
    finally:
        sessions = children(server.pid)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        kill(sessions)
        log.close()
        clients = processes_mentioning(str(tmp))  # ssh/scp/rsync started with our key or known_hosts
        kill(clients)
        assert not clients, f"ssh client processes were left running: {clients}"
        assert not [p for p in sessions if Path(f"/proc/{p}").exists() and is_live(p)], "sshd sessions left"


def is_live(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
