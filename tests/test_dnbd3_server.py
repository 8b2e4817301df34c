"""`stage4 serve` and the client against each other on loopback, raw protocol behaviour, hostile peers,
load."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage4.dnbd3 import protocol as p
from stage4.dnbd3.client import Client, ConnectionLost, Dnbd3Error, ImageUnavailable, RangeError, query_images
from stage4.dnbd3.server import DevServer
from stage4.dnbd3.verify import download, verify
from stage4.errors import Stage4Error
from stage4.export.publish import publish

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def make_qcow2(tmp: Path, extra_random: int = 20, convert_options: tuple[str, ...] = ()) -> Path:
    """A real qcow2 (qemu-img) holding a GPT disk with an ext4 root partition named and labelled SLX_SYS."""
    raw, image = tmp / "disk.raw", tmp / "disk.qcow2"
    with raw.open("wb") as handle:
        handle.truncate(64 * MiB)
    start = 4096 * 512
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "SLX_SYS",
            "-E",
            f"offset={start}",
            raw,
            f"{(64 * MiB - start - 34 * 512) // 1024}k",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "sgdisk",
            "-n",
            "1:2048:+1M",
            "-t",
            "1:EF02",
            "-c",
            "1:bios_grub",
            "-n",
            "2:4096:0",
            "-t",
            "2:8300",
            "-c",
            "2:SLX_SYS",
            raw,
        ],
        check=True,
        capture_output=True,
    )
    with raw.open("r+b") as handle:  # real non-zero data inside the partition, spanning several hash blocks
        handle.seek(20 * MiB)
        handle.write(os.urandom(extra_random * MiB))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", *convert_options, raw, image], check=True)
    raw.unlink()
    return image


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dnbd3")
    store = tmp / "store"
    store.mkdir()
    image = make_qcow2(tmp)
    pub = publish(image, store, "stage4/disk.qcow2", check_image=False, boot_files=False)
    random_file = tmp / "random.bin"
    random_file.write_bytes(os.urandom(3 * MiB + 123))
    publish(random_file, store, "rand", check_image=False, boot_files=False)
    return store, pub


@pytest.fixture(scope="module")
def server(published):
    store, _ = published
    with DevServer(store, read_timeout=2.0) as srv:
        yield srv


def addr(srv: DevServer) -> str:
    host, port = srv.address
    return f"{host}:{port}"


def test_verify_passes_and_reports_what_a_client_finds(server, published):
    store, pub = published
    report = verify(addr(server), "stage4/disk.qcow2", store=store, timeout=5)
    assert report.passed, report.problems
    assert report.rid == pub.rid and report.size == pub.size
    assert report.blocks_checked == report.blocks_total == -(-pub.size // (16 * MiB))
    text = "\n".join(report.facts)
    assert "qcow2 v3" in text and "GPT partitions: 1:bios_grub, 2:SLX_SYS" in text
    assert "filesystem ext4, label 'SLX_SYS'" in text
    assert "server CRC list" in text and "listed by /query?q=images" in text


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_verify_reads_through_compressed_clusters(tmp_path, compression, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    image = make_qcow2(
        tmp_path, extra_random=2, convert_options=("-c", "-o", f"compression_type={compression}")
    )
    publish(image, store, "comp.qcow2", check_image=False, boot_files=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # decoding runs in process: no zstd tool needed
    with DevServer(store, read_timeout=2.0) as srv:
        report = verify(addr(srv), "comp.qcow2", store=store, timeout=5)
    assert report.passed, report.problems
    text = "\n".join(report.facts)
    assert f"compression {compression}" in text and "filesystem ext4, label 'SLX_SYS'" in text


def test_zstd_cluster_output_is_bounded_and_bad_frames_are_disk_errors():
    import zstandard

    from stage4.dnbd3.diskview import DiskError, _zstd_cluster

    cluster = os.urandom(1000) + bytes(64 * 1024 - 1000)
    frame = zstandard.ZstdCompressor().compress(cluster)
    assert _zstd_cluster(frame + bytes(300), len(cluster)) == cluster  # sector padding after the frame
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * MiB))  # a hostile cluster inflating to 64 MiB
    assert _zstd_cluster(bomb, 64 * 1024) == bytes(64 * 1024)
    with pytest.raises(DiskError, match="does not decode"):
        _zstd_cluster(b"not a zstd frame" * 8, 64 * 1024)


def test_verify_with_wrong_identifier_fails(server, published):
    store, _ = published
    report = verify(addr(server), "stage4/disk.qcow2", store=store, identifier="OTHER", sample=2, timeout=5)
    assert not report.passed and any("no partition named 'OTHER'" in p for p in report.problems)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_byte_in_store_fails_verify_naming_the_block(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    source = tmp_path / "img"
    source.write_bytes(os.urandom(40 * MiB))
    publish(source, store, "c", check_image=False, boot_files=False)
    flip_byte(store / "c.r1", 16 * MiB + 777)  # one flipped byte in hash block 1
    with DevServer(store, read_timeout=2.0) as srv:
        report = verify(addr(srv), "c", store=store, timeout=5)
        assert not report.passed
        block_problems = [p for p in report.problems if p.startswith("block ")]
        assert len(block_problems) == 1 and block_problems[0].startswith("block 1 (bytes 16777216..33554431)")
        assert any("complete=60" in p for p in report.problems)
        with pytest.raises(Stage4Error, match="block 1"):
            download(addr(srv), "c", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        result = subprocess.run(
            [sys.executable, "-m", "stage4", "dnbd3", "verify", addr(srv), "c", "--store", str(store)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 1 and "block 1 (bytes 16777216..33554431)" in result.stdout


def test_serve_refuses_a_block_that_fails_its_crc_like_dnbd3_server(tmp_path):
    """docs/dnbd3-store.md, "A block that fails its CRC": no reply, the connection closed, a warning naming
    image, revision and block, `complete` below 100 in /query; the other blocks are still served."""
    store = tmp_path / "store"
    store.mkdir()
    data = bytearray(os.urandom(40 * MiB))
    (tmp_path / "img").write_bytes(data)
    publish(tmp_path / "img", store, "lab/c.qcow2", check_image=False, boot_files=False)
    publish(tmp_path / "img", store, "lab/c.qcow2", check_image=False, boot_files=False)
    flip_byte(store / "lab/c.qcow2.r2", 16 * MiB + 777)
    flip_byte(store / "lab/c.qcow2.r1", 32 * MiB + 5)  # found only by the full check (SIGUSR1)
    server = subprocess.Popen(
        [sys.executable, "-m", "stage4", "serve", str(store), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        address = server.stderr.readline().split(" on ", 1)[1].split(",", 1)[0]
        with Client.open(address, "lab/c.qcow2", timeout=5) as client:
            assert client.image.rid == 2
            assert client.read(0, 4096) == data[:4096]
            assert client.read(40 * MiB - 4096, 4096) == data[-4096:]
            # not a RangeError: no CMD_ERROR, the connection is closed
            with pytest.raises(
                ConnectionLost, match=r": server closed the connection while a reply header was expected$"
            ):
                client.read(16 * MiB - 4096, 8192)  # straddles blocks 0 and 1
        with Client.open(address, "lab/c.qcow2", 2, timeout=5) as client:
            assert client.read(32 * MiB, MiB) == data[32 * MiB : 33 * MiB]  # good blocks still served
            with pytest.raises(  # the result is remembered
                ConnectionLost, match=r": server closed the connection while a reply header was expected$"
            ):
                client.read(20 * MiB, 1)
        entries = {i["rid"]: i for i in query_images(address, timeout=5) if i["name"] == "lab/c.qcow2"}
        assert entries[2]["complete"] == 60 and entries[1]["complete"] == 100  # 512 of 1280 map bytes gone
        server.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and entries[1]["complete"] == 100:
            time.sleep(0.2)
            entries = {i["rid"]: i for i in query_images(address, timeout=5) if i["name"] == "lab/c.qcow2"}
        assert entries[1]["complete"] == 80 and entries[2]["complete"] == 60  # block 2 holds 8 MiB: 256 bytes
    finally:
        server.send_signal(signal.SIGTERM)
        log = server.communicate(timeout=10)[1]
    assert "Hash check for block 1 of lab/c.qcow2:2 failed" in log
    assert "Hash check for block 2 of lab/c.qcow2:1 failed" in log
    assert "block 0 " not in log and "block 2 of lab/c.qcow2:2" not in log


def test_sampled_verify_and_download(server, published, tmp_path):
    store, pub = published
    report = verify(addr(server), "stage4/disk.qcow2", store=store, sample=2, timeout=5)
    assert report.passed and report.blocks_checked == 2
    rid, size, _ = download(addr(server), "stage4/disk.qcow2", tmp_path / "copy.qcow2")
    assert (tmp_path / "copy.qcow2").read_bytes() == Path(pub.image).read_bytes()
    assert (rid, size) == (pub.rid, pub.size)


def test_missing_image_and_rid(server):
    with pytest.raises(ImageUnavailable, match="not available"):
        Client.open(addr(server), "nope", timeout=5)
    with pytest.raises(
        ImageUnavailable, match=re.escape(f"{addr(server)}: image 'rand' revision 9 is not available")
    ):
        Client.open(addr(server), "rand", 9, timeout=5)
    with Client.open(addr(server), "rand", 0, timeout=5) as client:
        assert client.image.rid == 1


def test_rid_zero_finds_a_revision_published_while_running(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    data = tmp_path / "d"
    data.write_bytes(os.urandom(5000))
    publish(data, store, "img", check_image=False, boot_files=False)
    with DevServer(store, read_timeout=2.0) as srv:
        with Client.open(addr(srv), "img", timeout=5) as client:
            assert client.image.rid == 1 and client.image.size == 8192
        publish(data, store, "img", rid=9, check_image=False, boot_files=False)
        with Client.open(addr(srv), "img", timeout=5) as client:
            assert client.image.rid == 9
            assert client.read(0, 8192) == data.read_bytes() + bytes(8192 - 5000)


def raw_connect(srv: DevServer, name: str = "rand", rid: int = 0) -> tuple[socket.socket, p.SelectReply]:
    sock = socket.create_connection(srv.address, timeout=5)
    sock.sendall(p.select_image_request(name, rid))
    header = p.parse_reply(recv_exact(sock, 16))
    return sock, p.parse_select_reply(recv_exact(sock, header.size))


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def test_raw_protocol_behaviour(server):
    sock, image = raw_connect(server)
    with sock:
        # KEEPALIVE before any GET_BLOCK: handle 0 (R11).
        sock.sendall(p.simple_request(p.CMD_KEEPALIVE))
        assert recv_exact(sock, 16) == p.Reply(p.CMD_KEEPALIVE, 0, 0).pack()
        sock.sendall(p.get_block_request(image.size - 1, 1, 0x1111))
        assert p.parse_reply(recv_exact(sock, 16)) == p.Reply(p.CMD_GET_BLOCK, 1, 0x1111)
        assert recv_exact(sock, 1) == b"\0"  # padding byte (file is 3 MiB + 123)
        # replies to other commands carry the last GET_BLOCK's handle, whatever theirs was
        sock.sendall(p.Request(p.CMD_KEEPALIVE, 0, 0, 0x2222).pack())
        assert p.parse_reply(recv_exact(sock, 16)) == p.Reply(p.CMD_KEEPALIVE, 0, 0x1111)
        # range errors: ERROR with the request's handle, connection stays open (R10)
        for offset, size in ((image.size, 0), (image.size, 1), (0, image.size + 1), (1 << 40, 1)):
            sock.sendall(p.get_block_request(offset, size, 7))
            assert recv_exact(sock, 16) == p.Reply(p.CMD_ERROR, 0, 7).pack()
        sock.sendall(p.get_block_request(5, 0, 8))
        assert recv_exact(sock, 16) == p.Reply(p.CMD_GET_BLOCK, 0, 8).pack()
        # GET_CRC32: the .crc bytes; GET_SERVERS: empty; SET_CLIENT_MODE and unknown commands: silence
        sock.sendall(
            p.simple_request(p.CMD_SET_CLIENT_MODE) + p.simple_request(99) + p.simple_request(p.CMD_GET_CRC32)
        )
        reply = p.parse_reply(recv_exact(sock, 16))
        assert (reply.cmd, reply.size, reply.handle) == (p.CMD_GET_CRC32, 8, 8)
        recv_exact(sock, 8)
        sock.sendall(p.simple_request(p.CMD_GET_SERVERS))
        assert recv_exact(sock, 16) == p.Reply(p.CMD_GET_SERVERS, 0, 8).pack()
        # a payload on a command without one (R12) ends the connection
        sock.sendall(p.Request(p.CMD_KEEPALIVE, 4).pack())
        assert sock.recv(16) == b""


@pytest.mark.parametrize(
    "frame",
    [
        p.select_image_request("rand", 0)[:2][::-1] + p.select_image_request("rand", 0)[2:],  # swapped magic
        p.get_block_request(0, 4096, 1),  # first command is not SELECT_IMAGE
        p.select_image_request("rand", 0, version=1),
        p.select_image_request("rand.r1", 0),  # the file name is not the image name
        p.select_image_request("Rand", 0),  # case matters
        p.select_image_request("/rand", 0),
        p.select_image_request(".rand", 0),
        p.select_image_request("a/../rand", 0),
        p.Request(p.CMD_SELECT_IMAGE, 2).pack() + b"\3\0",  # only the version
        p.Request(p.CMD_SELECT_IMAGE, 1001).pack(),
    ],
)
def test_bad_handshakes_are_closed_without_reply(server, frame):
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(frame)
        assert sock.recv(64) == b""


def test_http_query_on_the_same_port(server):
    images = query_images(addr(server), timeout=5)
    names = {(i["name"], i["rid"]) for i in images}
    assert ("rand", 1) in names
    entry = next(i for i in images if i["name"] == "rand")
    assert entry["size"] == 3 * MiB + 4096 and entry["complete"] == 100 and entry["problems"] == 0
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"GET /nothing HTTP/1.0\r\nHost: x\r\n\r\n")
        assert b"404" in sock.recv(100)


# --- hostile peers ----------------------------------------------------------------------------------------

frames = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda cmd, size, off, handle: p.Request(cmd, size, off, handle).pack(),
        st.integers(0, 12),
        st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(
        lambda name, rid, v: p.select_image_request(name, rid, version=v),
        st.sampled_from(["rand", "nope", "stage4/disk.qcow2", "a//rand"]),
        st.integers(0, 3),
        st.integers(0, 5),
    ),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(stream=st.lists(frames, max_size=8))
def test_server_handler_survives_hostile_frames(server, stream):
    """Random frames into the request handler: it ends on EOF, and everything it sends is a valid reply."""
    ours, theirs = socket.socketpair()
    worker = threading.Thread(target=server.handle_socket, args=(theirs,), daemon=True)
    worker.start()
    try:
        ours.settimeout(5)
        with ours:
            ours.sendall(b"".join(stream))
            ours.shutdown(socket.SHUT_WR)
            received = b""
            with contextlib.suppress(ConnectionResetError):  # closing with unread bytes resets (R9)
                while chunk := ours.recv(1 << 20):
                    received += chunk
        worker.join(timeout=5)
        assert not worker.is_alive(), "handler did not end after EOF"
    finally:
        theirs.close()
    if received.startswith(b"HTTP/"):
        return
    view, position = received, 0
    while position < len(view):  # every byte sent is part of a well-formed reply
        reply = p.parse_reply(view[position : position + 16])
        assert reply.cmd in (1, 2, 3, 4, 5, 8)
        position += 16 + reply.size
    assert position == len(view)


replies = st.one_of(
    st.binary(max_size=48),
    st.builds(
        lambda cmd, size, handle: p.Reply(cmd, size, handle).pack(),
        st.integers(0, 10),
        st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        st.integers(0, 3),
    ),
    st.builds(
        lambda name, rid, size: p.select_reply(3, name, rid, size),
        st.sampled_from(["img", "other"]),
        st.integers(0, 3),
        st.integers(0, 1 << 20),
    ),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(replies, max_size=6), close=st.booleans())
def test_client_survives_hostile_replies(stream, close):
    """Random replies to a client: each operation ends with data or a Dnbd3Error, within its timeout."""
    ours, theirs = socket.socketpair()
    payload = b"".join(stream)

    def fake_server():
        try:
            theirs.sendall(payload)
            if close:
                theirs.shutdown(socket.SHUT_WR)
            else:
                time.sleep(0.1)
        except OSError:
            pass

    feeder = threading.Thread(target=fake_server, daemon=True)
    feeder.start()
    client = Client.attach(ours, timeout=0.05, where="fake")
    started = time.monotonic()
    try:
        try:
            image = client.handshake("img", 0)
            assert image.name == "img" and image.rid != 0 and image.size >= 4096
            client.crc_list()
            client.read(0, 4096)
            client.keepalive()
        except Dnbd3Error:
            pass
        assert time.monotonic() - started < 3
    finally:
        client.close()
        feeder.join(timeout=2)
        theirs.close()


def test_silent_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        started = time.monotonic()
        where = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(
            ImageUnavailable,
            match=re.escape(f"{where}: image 'img' is not available (no answer within 0.3 s"),
        ):
            Client.open(where, "img", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        listener.close()


def test_server_closing_mid_reply_is_a_short_read_error():
    ours, theirs = socket.socketpair()
    theirs.sendall(p.select_reply(3, "img", 1, 8192) + p.Reply(p.CMD_GET_BLOCK, 4096, 1).pack() + b"x" * 100)
    theirs.shutdown(socket.SHUT_WR)
    client = Client.attach(ours, timeout=1, where="fake")
    try:
        assert client.handshake("img").size == 8192
        with pytest.raises(  # checked before sending: beyond the announced size
            RangeError, match=r"^fake: range 8192\+1 lies outside the image of 8192 bytes$"
        ):
            client.read(8192, 1)
        with pytest.raises(ConnectionLost, match="short read"):
            client.read(0, 4096)
        with pytest.raises(ConnectionLost, match="not connected|closed"):
            client.read(0, 1)
    finally:
        client.close()
        theirs.close()


# --- load ------------------------------------------------------------------------------------------------


def test_32_concurrent_clients_read_random_blocks(server, published):
    store, pub = published
    expected = Path(pub.image).read_bytes()
    size = len(expected)
    errors: list[BaseException] = []
    checked = [0]
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with Client.open(addr(server), "stage4/disk.qcow2", timeout=10) as client:
                ranges = []
                for _ in range(24):
                    length = rng.choice([1, 512, 4096, 65536, 1 << 20])
                    ranges.append((rng.randrange(0, size - length + 1), length))
                for offset, data in client.read_many(ranges, window=8):
                    assert bytes(data) == expected[offset : offset + len(data)], f"mismatch at {offset}"
                    with lock:
                        checked[0] += len(data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(32)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert checked[0] > 32 * 24
    assert time.monotonic() - started < 30
