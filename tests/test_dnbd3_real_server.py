"""stage4's store against the real `dnbd3-server` (built from the cached dnbd3 source by
tests/dnbd3_servers.py): a primary serves what `export` published, with its CRC list, and a replicating
proxy copies it exactly. The netboot end-to-end test boots a client through such a proxy."""

from __future__ import annotations

import os
from pathlib import Path

from stage4.dnbd3.client import Client
from stage4.export.publish import publish
from stage4.fsutil import sha256_file
from tests.dnbd3_servers import reference_crc, replica, running, server_binary

MiB = 1 << 20
NAME = "stage4/real-server.img"


def listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* write them) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_a_real_primary_serves_an_export_and_a_proxy_replicates_it(tmp_path: Path) -> None:
    binary = server_binary()
    store, proxy_store = tmp_path / "store", tmp_path / "proxy-store"
    store.mkdir()
    proxy_store.mkdir()
    # Three 16 MiB hash blocks, the last one not 4 KiB-aligned until export pads it (the real server's
    # load-time CRC check fails such a block otherwise).
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(40 * MiB + 5000))
    revision = publish(data, store, NAME, check_image=False, boot_files=False)
    published = store / f"{NAME}.r{revision.rid}"
    crc = published.with_name(published.name + ".crc").read_bytes()
    assert reference_crc(binary, published, tmp_path / "crc") == crc  # the server's own generator agrees
    with (
        running(binary, tmp_path / "primary", store) as primary,
        running(binary, tmp_path / "proxy", proxy_store, uplink=primary) as proxy,
    ):
        assert listening(primary.port) == listening(proxy.port) == {"0100007F"}  # 127.0.0.1 only
        with Client.open(primary.address, NAME, revision.rid, timeout=10) as client:
            assert client.crc_list() == crc  # a server that discards a .crc sends an empty list
        with Client.open(proxy.address, NAME, revision.rid, timeout=30) as client:
            assert client.read(20 * MiB, 65536) == published.read_bytes()[20 * MiB : 20 * MiB + 65536]
        copy = replica(proxy, NAME, revision.rid, timeout=60)
    assert sha256_file(copy) == sha256_file(published)
    assert copy.with_name(copy.name + ".crc").read_bytes() == crc  # fetched from the primary (GET_CRC32)
    for server in (primary, proxy):
        assert "Hash check for block" not in server.log_text(), server.log
