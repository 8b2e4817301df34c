"""A small read-only DNBD3 server for local development and tests.

This is a DEVELOPMENT server. Production serving is the job of dnbd3-server; this one exists so that
`stage4 dnbd3 verify`, the tests and a developer's laptop have something that speaks the same protocol
and reads the same store layout (docs/dnbd3-protocol.md, "A test server"): the handshake, GET_BLOCK
(zeros between the real and the 4 KiB-rounded virtual size, CMD_ERROR for ranges past the end),
GET_SERVERS, GET_CRC32 (the `.crc` bytes, or nothing if the server would discard them), KEEPALIVE,
silence for SET_CLIENT_MODE and unknown commands, and `GET /query?q=images` on the same port. RID 0 means
the newest revision, found by looking at the store again on every such request, as the real server does.
Like the real server it keeps an image open once selected and lists only loaded images in /query;
`rescan()` (SIGHUP in `stage4 serve`) loads new files and drops vanished ones.

Block CRCs are checked against the `.crc` list the first time a read touches a 16 MiB hash block, and the
result is remembered (`check_all()`, SIGUSR1 in `stage4 serve`, checks every block again). A block that
fails is refused the way a primary dnbd3-server refuses it (docs/dnbd3-store.md, "A block that fails its
CRC"): the warning names image, revision and block, every GET_BLOCK touching it gets the connection closed
without a reply, and /query shows `complete` below 100. Unlike the real server it keeps refusing the
block (the real one serves it again after about 20 s until its next check).

Stricter than the real server where that catches client bugs: a request other than GET_BLOCK or
SELECT_IMAGE that carries a payload size closes the connection (docs/dnbd3-protocol.md, "Payloads").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from stage4.dnbd3 import protocol as p
from stage4.dnbd3.loaded import LoadedImage, Registry

DEFAULT_READ_TIMEOUT = 15.0
IDLE_TIMEOUTS = 4  # consecutive read timeouts before an idle connection is closed (about 60 s)
HTTP_HEADER_LIMIT = 8192
SEND_CHUNK = 1 << 20
VERSION = "stage4-dev"


class _Closed(Exception):
    """The connection ended (EOF, reset, idle, or a request we answer by closing)."""


class Connection:
    """One client connection: handshake, then requests until EOF, error or idle timeout."""

    def __init__(self, sock: socket.socket, server: DevServer):
        self.sock = sock
        self.server = server
        self.registry = server.registry
        self.last_handle = 0
        self.image: LoadedImage | None = None
        self.file: BinaryIO | None = None

    def recv_exact(self, count: int) -> bytes:
        chunks = bytearray()
        idle = 0
        while len(chunks) < count:
            try:
                data = self.sock.recv(count - len(chunks))
            except TimeoutError:
                idle += 1
                if idle >= self.server.idle_timeouts:
                    raise _Closed("idle") from None
                continue
            except OSError as exc:
                raise _Closed(str(exc)) from None
            if not data:
                raise _Closed("eof")
            idle = 0
            chunks += data
        return bytes(chunks)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise _Closed(str(exc)) from None
        self.server.bytes_sent += len(data)

    def run(self) -> None:
        try:
            self._handshake()
            while True:
                self._request()
        except (_Closed, p.ProtocolError):
            pass
        finally:
            if self.image is not None:
                self.image.users -= 1
                self.image.last_use = time.time()
            if self.file is not None:
                self.file.close()

    def _handshake(self) -> None:
        header = self.recv_exact(p.REQUEST_SIZE)
        if header[:2] != p.MAGIC_BYTES:
            if header[:1] in (b"G", b"P"):
                self._http(header)
            raise _Closed("not dnbd3")
        request = p.parse_request(header)
        if request.cmd != p.CMD_SELECT_IMAGE or not 3 <= request.size <= p.MAX_PAYLOAD:
            raise _Closed("bad handshake")
        select = p.parse_select_image(self.recv_exact(request.size))
        if select.version < p.MIN_SUPPORTED_VERSION:
            raise _Closed("client too old")
        image = self.registry.get(select.name, select.rid)
        if image is None:
            raise _Closed("no such image")
        try:
            self.file = open(image.path, "rb")
        except OSError:
            raise _Closed("unreadable") from None
        self.image = image
        image.users += 1
        version = min(select.version, p.PROTOCOL_VERSION)
        self.send(p.select_reply(version, image.name, image.rid, image.virtual_size))

    def _request(self) -> None:
        image, file = self.image, self.file
        assert image is not None and file is not None  # set by _handshake before the first request
        request = p.parse_request(self.recv_exact(p.REQUEST_SIZE))
        if request.cmd == p.CMD_GET_BLOCK:
            self._get_block(request, image, file)
            return
        if request.size != 0:
            raise _Closed("payload on a command without payload")  # the real server desynchronises
        if request.cmd == p.CMD_KEEPALIVE:
            self.send(p.Reply(p.CMD_KEEPALIVE, 0, self.last_handle).pack())
        elif request.cmd == p.CMD_GET_SERVERS:
            payload = b"".join(entry.pack() for entry in self.server.alt_servers[: p.MAX_SERVERS])
            self.send(p.Reply(p.CMD_GET_SERVERS, len(payload), self.last_handle).pack() + payload)
        elif request.cmd == p.CMD_GET_CRC32:
            crc = image.crc
            self.send(p.Reply(p.CMD_GET_CRC32, len(crc), self.last_handle).pack() + crc)
        # SET_CLIENT_MODE, LATEST_RID and unknown commands: no reply, connection kept.

    def _get_block(self, request: p.Request, image: LoadedImage, file: BinaryIO) -> None:
        offset = request.offset & p.OFFSET_MASK
        size = request.size
        self.last_handle = request.handle
        vsize = image.virtual_size
        if offset >= vsize or offset + size > vsize:
            self.send(p.Reply(p.CMD_ERROR, 0, request.handle).pack())
            return
        end = offset + size
        if size and offset < image.real_size:
            for index in range(offset // p.HASH_BLOCK_SIZE, (end - 1) // p.HASH_BLOCK_SIZE + 1):
                if not image.block_ok(index, file.fileno(), self.server.log):
                    # What a primary dnbd3-server does with a block that failed its hash check: no reply,
                    # no CMD_ERROR (that would mean "past the end"); the connection is closed.
                    raise _Closed(f"block {index} failed its hash check")
        self.send(p.Reply(p.CMD_GET_BLOCK, size, request.handle).pack())
        real_end = min(end, image.real_size)
        if offset < real_end:
            try:
                self.sock.sendfile(file, offset, real_end - offset)
            except OSError as exc:
                raise _Closed(str(exc)) from None
            self.server.bytes_sent += real_end - offset
        zeros = end - max(offset, real_end)
        while zeros > 0:
            step = min(zeros, SEND_CHUNK)
            self.send(bytes(step))
            zeros -= step

    def _http(self, head: bytes) -> None:
        data = bytearray(head)
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < HTTP_HEADER_LIMIT:
            try:
                chunk = self.sock.recv(HTTP_HEADER_LIMIT - len(data))
            except OSError:
                return
            if not chunk:
                break
            data += chunk
        line = bytes(data).split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2 or parts[0] not in ("GET", "POST"):
            return
        url = urllib.parse.urlsplit(parts[1])
        if url.path != "/query":
            self._http_reply(404, "text/plain", b"Not found")
            return
        self._http_reply(200, "application/json", json.dumps(self.server.query(url.query)).encode())

    def _http_reply(self, status: int, kind: str, body: bytes) -> None:
        reason = {200: "OK", 404: "Not found"}[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(_Closed):
            self.send(head + body)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: DevServer):
        self.owner = owner
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _TCPServer)  # the only server this handler is used with
        server.owner.handle_socket(self.request)


class DevServer:
    """A development DNBD3 server on `host:port` (port 0: any free port) serving the store at `root`."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        idle_timeouts: int = IDLE_TIMEOUTS,
        alt_servers: Iterable[p.ServerEntry] = (),
        log: Callable[[str], None] | None = None,
        scan: bool = True,
    ):
        self.log = log or (lambda _line: None)
        self.registry = Registry(Path(root), self.log)
        self.read_timeout = read_timeout
        self.idle_timeouts = idle_timeouts
        self.alt_servers = list(alt_servers)
        self.bytes_sent = 0
        self.started = time.time()
        self.run_id = int.from_bytes(os.urandom(4), "little")
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if scan:
            self.registry.rescan()
        self._tcp = _TCPServer((host, port), self)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._tcp.server_address[:2]
        assert isinstance(host, str)  # getsockname() of an AF_INET / AF_INET6 socket
        return host, port

    def handle_socket(self, sock: socket.socket) -> None:
        """Serve one accepted connection until it ends (also usable on a socketpair in tests)."""
        sock.settimeout(self.read_timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._clients_lock:
            self._clients.add(sock)
        try:
            Connection(sock, self).run()
        finally:
            with self._clients_lock:
                self._clients.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def rescan(self) -> None:
        self.registry.rescan()

    def check_all(self) -> None:
        self.registry.check_all()

    def query(self, query: str) -> dict[str, object]:
        wanted = set(urllib.parse.parse_qs(query).get("q", []))
        result: dict[str, object] = {}
        if "images" in wanted:
            result["runId"] = self.run_id
            result["images"] = [
                {
                    "id": img.id,
                    "name": img.name,
                    "wwn": f"0x{hash(img.name) & 0xFFFFFFFFFFFF:x}",
                    "rid": img.rid,
                    "users": max(img.users, 0),
                    "complete": img.complete(),
                    "idle": int(time.time() - img.last_use),
                    "size": img.virtual_size,
                    "problems": 0,
                }
                for img in self.registry.loaded()
            ]
        if "stats" in wanted:
            with self._clients_lock:
                clients = len(self._clients)
            result.update(
                bytesReceived=0,
                bytesSent=self.bytes_sent,
                clientCount=clients,
                serverCount=0,
                uptime=int(time.time() - self.started),
                runId=self.run_id,
            )
        if "version" in wanted:
            result.update(version=VERSION, build="stage4")
        return result

    def serve_forever(self) -> None:
        self._tcp.serve_forever(poll_interval=0.2)

    def start(self) -> DevServer:
        self._thread = threading.Thread(target=self.serve_forever, name="dnbd3-dev-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._tcp.shutdown()
            self._thread.join(timeout=5)
        self._tcp.server_close()
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
