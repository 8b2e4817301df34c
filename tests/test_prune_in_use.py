"""Revisions in use are protected: prune asks the DNBD3 servers and keeps a revision that has users.

A real client of `stage4 serve` holds a connection to a revision; the server's /query reports its user,
and prune refuses to remove it (naming it) unless --force. Only servers on loopback are asked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stage4.dnbd3.client import Client
from stage4.dnbd3.server import DevServer
from stage4.dnbd3.store import Store
from stage4.errors import Stage4Error
from stage4.export.publish import publish
from stage4.export.revisions import prune
from tests.conftest import STAGE4

NAME = "lab/in-use.qcow2"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    image = tmp_path / "src.img"
    image.write_bytes(os.urandom((16 << 20) + 4096))
    store = tmp_path / "store"
    store.mkdir()
    for rid in (1, 2, 3):
        assert publish(image, store, NAME, check_image=False, boot_files=False).rid == rid
    return store


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([STAGE4, *args], capture_output=True, text=True, timeout=120, check=False)


def test_prune_keeps_a_revision_with_a_client_and_removes_it_with_force(store: Path) -> None:
    with DevServer(store, read_timeout=30.0) as server:
        address = f"127.0.0.1:{server.address[1]}"
        with Client.open(address, NAME, 1):  # a client of r1, as a netbooted machine is
            with pytest.raises(Stage4Error, match=r"r1 has 1 user\(s\) on 127\.0\.0\.1"):
                prune(store, NAME, 1, servers=[address])
            assert [r.rid for r in Store(store).revisions(NAME)] == [1, 2, 3]
            result = _cli("prune", NAME, "--store", str(store), "--keep", "1", "--server", address)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
            assert "r1 has 1 user(s)" in result.stderr and "Traceback" not in result.stderr
            assert [r.rid for r in Store(store).revisions(NAME)] == [1, 2, 3]
            # r2 has no user: with only r2 removable, prune goes ahead
            assert prune(store, NAME, 1, protect=[1], servers=[address]) == [2]
            result = _cli("prune", NAME, "--store", str(store), "--keep", "1", "--server", address, "--force")
            assert result.returncode == 0 and "removed r1" in result.stdout, result.stderr
    assert [r.rid for r in Store(store).revisions(NAME)] == [3]


def test_a_server_that_cannot_be_asked_stops_the_prune(store: Path) -> None:
    with DevServer(store) as server:
        port = server.address[1]
    # the server is gone: nobody can say whether r1 and r2 have users
    with pytest.raises(
        Stage4Error, match=rf"cannot ask 127\.0\.0\.1:{port} whether revisions r1, r2 have users"
    ):
        prune(store, NAME, 1, servers=[f"127.0.0.1:{port}"])
    assert [r.rid for r in Store(store).revisions(NAME)] == [1, 2, 3]
    assert prune(store, NAME, 1, servers=[f"127.0.0.1:{port}"], force=True) == [1, 2]
