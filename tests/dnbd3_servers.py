"""Real dnbd3-servers for tests: `dnbd3-server` built once per test run from the dnbd3 commit in stage4's
source cache, run as a primary or as a replicating proxy of another one, listening on 127.0.0.1 only.

Facts used here (from dnbd3's src/server): `-b` is the only way to choose the listen address (there is
no config key); `-n` keeps it in the foreground; a proxy (`isProxy=true`) clones an image it does not
hold from the servers of its `alt-servers` file into `<basePath>/<name>.r<RID>`, with a `.map` cache map
beside it and the `.crc` list it fetched with GET_CRC32, and deletes the `.map` when every block is
present, then logs "Replication of <name> complete.".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stage4 import config
from stage4.fsutil import exclusive_lock
from stage4.provisioning.source_cache import SourceCache
from stage4.runner import Runner, _die_with_parent
from tests.conftest import session_cache
from tests.upstream import require_upstream

READY = "Server is ready."
# What the server logs before it exits when another process took the port between probe and start.
PORT_TAKEN = "Could not listen on any local interface."
START_TIMEOUT = 30


def server_binary() -> Path:
    """dnbd3-server built from the cached dnbd3 commit into this run's cache: once per run, the second
    worker waits for the first one's build (skips with one line when the source is not cached)."""
    cache = session_cache()
    require_upstream(cache, ("dnbd3",))
    source = config.default_components()["dnbd3"].source
    sources = SourceCache(cache)
    entry = sources.git_entry(source.git, source.ref)
    assert entry and entry.commit, f"{source.git} {source.ref} not in {sources.root}"
    folder = cache / "dnbd3-server" / entry.commit[:12]
    binary = folder / "build/src/server/dnbd3-server"
    with exclusive_lock(folder.with_name(folder.name + ".lock"), lambda: None):
        if not binary.is_file():
            # Built aside and renamed into place: an interrupted build leaves no half-linked binary.
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            runner, step = Runner(), "build dnbd3-server"
            sources.checkout(source.git, entry.commit, partial / "src", runner, step)
            # The server only: the kernel module would need kernel headers, the fuse client libfuse.
            runner.run(
                ["cmake", "-S", partial / "src", "-B", partial / "build", "-DCMAKE_BUILD_TYPE=Release"]
                + ["-DDNBD3_KERNEL_MODULE=OFF", "-DDNBD3_CLIENT_FUSE=OFF", "-DDNBD3_SERVER=ON"],
                step=step,
                capture=True,
            )
            runner.run(
                ["cmake", "--build", partial / "build", "--target", "dnbd3-server", "--parallel", "2"],
                step=step,
                capture=True,
                timeout=900,
            )
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return binary


@dataclass
class RealServer:
    """A running dnbd3-server: its port on 127.0.0.1, its image store (basePath) and its log."""

    port: int
    store: Path
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def running(
    binary: Path, folder: Path, store: Path, uplink: RealServer | None = None
) -> Iterator[RealServer]:
    """dnbd3-server with its config in `folder` serving `store`, on a free port of 127.0.0.1, until the
    context ends (then stopped, also when the test fails). Without `uplink` a primary; with it a proxy
    that replicates every block (background replication) of what its clients ask for from `uplink`."""
    folder.mkdir(parents=True, exist_ok=True)
    if uplink is not None:
        # for=replication: the proxy's uplink only, never offered to clients by GET_SERVERS (a guest
        # could not reach the host's 127.0.0.1). A section without a key would be ignored.
        (folder / "alt-servers").write_text(f"[{uplink.address}]\ncomment=primary\nfor=replication\n")
    role = "isProxy=true\nbackgroundReplication=true\n" if uplink else "isProxy=false\n"
    for _attempt in range(3):
        port = _free_port()
        # No inline comments: the server's INI parser would keep them in the value.
        (folder / "server.conf").write_text(
            f"[dnbd3]\nbasePath={store}\nlistenPort={port}\n{role}"
            "[logging]\nconsoleMask=ERROR WARNING MINOR INFO DEBUG1\nconsoleTimestamps=true\n"
        )
        server = RealServer(port, store, folder / "dnbd3-server.log")
        with server.log.open("w") as log:
            process = subprocess.Popen(
                [binary, "-n", "-b", "127.0.0.1", "-c", folder],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),  # and when pytest is killed, not only when a test fails
            )
        try:
            if _ready(process, server):
                yield server
                return
        finally:
            _stop(process)
        if PORT_TAKEN not in server.log_text():
            break
    pytest.fail(f"dnbd3-server did not start ({server.log}):\n{server.log_text()[-2000:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ready(process: subprocess.Popen[bytes], server: RealServer) -> bool:
    """Whether the server said it is ready and accepts connections; False once it has exited. Its exit
    status proves nothing (0 when it cannot read basePath)."""
    deadline = time.monotonic() + START_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        if READY in server.log_text():
            with socket.create_connection(("127.0.0.1", server.port), timeout=5):
                return True
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # a clean shutdown takes about a second
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def replica(proxy: RealServer, name: str, rid: int, timeout: float) -> Path:
    """The proxy's copy of `name`:`rid` once its replication is complete (waits at most `timeout` s)."""
    copy = proxy.store / f"{name}.r{rid}"
    cache_map = copy.with_name(copy.name + ".map")
    deadline = time.monotonic() + timeout
    while f"Replication of {name} complete." not in proxy.log_text():
        if time.monotonic() > deadline:
            present = "no copy" if not copy.is_file() else "no cache map"
            if cache_map.is_file():
                bits = sum(bin(byte).count("1") for byte in cache_map.read_bytes())
                present = f"{bits} of {-(-copy.stat().st_size // 4096)} 4 KiB blocks"
            pytest.fail(f"{proxy.address}: {name}:{rid} not replicated after {timeout:.0f} s ({present})")
        time.sleep(1)
    assert not cache_map.exists(), f"{cache_map} left beside a complete copy"
    return copy


def reference_crc(binary: Path, image: Path, work: Path) -> bytes:
    """The .crc file dnbd3-server's own generator (`--crc`) writes for `image` (a hard link to it in
    `work`, so nothing is written beside the published file)."""
    work.mkdir(parents=True, exist_ok=True)
    linked = work / image.name
    os.link(image, linked)
    subprocess.run([binary, "--crc", linked], capture_output=True, check=True, timeout=300)
    return linked.with_name(linked.name + ".crc").read_bytes()
