"""A DNBD3 client on standard-library sockets (docs/dnbd3-protocol.md).

Every socket operation has a timeout and every reply is checked before its payload is read, so a
server that closes the connection, stalls, sends short or malformed frames or claims a huge payload
produces a one-line Dnbd3Error, never a hang or an unbounded read. GET_BLOCK replies are matched by
handle; every other reply by command (docs/dnbd3-protocol.md, "Reply handles"). Requests other than
GET_BLOCK carry size 0 (same document, "Payloads").
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import re
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from stage4.dnbd3 import protocol as p
from stage4.errors import InputError, Stage4Error

DEFAULT_TIMEOUT = 10.0
PIPELINE = 16
MIN_RATE = 1 << 20  # bytes per second a payload must at least arrive with


class Dnbd3Error(Stage4Error):
    """The server did not answer as the protocol says."""


class ImageUnavailable(Dnbd3Error):
    """The server closed the connection during the handshake: unknown image or RID, or refused; there is no
    error reply (docs/dnbd3-protocol.md, "Handshake")."""


class ConnectionLost(Dnbd3Error):
    """The server closed the connection or went silent after the handshake: for a GET_BLOCK, a range it cannot
    serve now, such as a block that failed its CRC (docs/dnbd3-protocol.md, "GET_BLOCK")."""


class RangeError(Dnbd3Error):
    """The server answered a GET_BLOCK with CMD_ERROR: the range lies past the end of the image
    (docs/dnbd3-protocol.md, "GET_BLOCK")."""


# A host name: dot-separated labels (RFC 1123, plus the '_' that /etc/hosts entries may have).
HOST_RE = re.compile(
    r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def server_address(server: str) -> tuple[str, int]:
    """`host[:port]` of a server, checked before anything is sent: a bad one is bad input, not a failure."""
    host, port = p.parse_address(server)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not HOST_RE.match(host):
            raise InputError(
                f"server address {server!r}: {host!r} is not a host name or IP address"
            ) from None
    return host, port


@dataclass(frozen=True)
class BlockRequest:
    handle: int
    offset: int
    size: int


class Client:
    """One connection to one image. Use `Client.open(server, name, rid)` or as a context manager."""

    def __init__(self, host: str, port: int = p.DEFAULT_PORT, *, timeout: float = DEFAULT_TIMEOUT):
        self.host, self.port, self.timeout = host, port, timeout
        self.where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.sock: socket.socket | None = None
        self.image: p.SelectReply | None = None
        self._next_handle = 1

    @classmethod
    def open(cls, server: str, name: str, rid: int = 0, *, timeout: float = DEFAULT_TIMEOUT) -> Client:
        host, port = server_address(server)
        client = cls(host, port, timeout=timeout)
        try:
            client.select(name, rid)
        except BaseException:
            client.close()
            raise
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    # --- low level -----------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except TimeoutError:
            raise Dnbd3Error(f"{self.where}: connection timed out after {self.timeout:g} s") from None
        except OSError as exc:
            raise Dnbd3Error(f"{self.where}: cannot connect: {exc.strerror or exc}") from None
        self.sock.settimeout(self.timeout)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise ConnectionLost(f"{self.where}: not connected")
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self.close()
            raise ConnectionLost(f"{self.where}: timed out sending a request") from None
        except OSError as exc:
            self.close()
            raise ConnectionLost(
                f"{self.where}: connection lost while sending: {exc.strerror or exc}"
            ) from None

    def _recv_into(self, view: memoryview, what: str, error: type[Dnbd3Error] = ConnectionLost) -> None:
        """Fill `view` completely or raise: EOF, reset, timeout and a too slow peer each end in an error."""
        if self.sock is None:
            raise ConnectionLost(f"{self.where}: not connected")
        deadline = time.monotonic() + self.timeout + len(view) / MIN_RATE
        got = 0
        while got < len(view):
            if time.monotonic() > deadline:
                self.close()
                raise error(f"{self.where}: {what} did not arrive in time")
            try:
                count = self.sock.recv_into(view[got:])
            except TimeoutError:
                self.close()
                raise error(
                    f"{self.where}: no answer within {self.timeout:g} s while reading {what}"
                ) from None
            except OSError as exc:
                self.close()
                raise error(
                    f"{self.where}: connection lost while reading {what}: {exc.strerror or exc}"
                ) from None
            if count == 0:
                self.close()
                closed = "closed the connection" + (" (short read)" if got else "")
                raise error(f"{self.where}: server {closed} while {what} was expected")
            got += count

    def _recv(self, size: int, what: str, error: type[Dnbd3Error] = ConnectionLost) -> bytearray:
        buffer = bytearray(size)
        if size:
            self._recv_into(memoryview(buffer), what, error)
        return buffer

    def _reply(self, error: type[Dnbd3Error] = ConnectionLost) -> p.Reply:
        raw = self._recv(p.REPLY_SIZE, "a reply header", error)
        try:
            return p.parse_reply(raw)
        except p.ProtocolError as exc:
            self.close()
            raise Dnbd3Error(f"{self.where}: malformed reply: {exc}") from None

    def _malformed(self, message: str) -> Dnbd3Error:
        self.close()
        return Dnbd3Error(f"{self.where}: malformed reply: {message}")

    # --- protocol ------------------------------------------------------------------------------------

    def select(self, name: str, rid: int = 0) -> p.SelectReply:
        """Connect and select the image (the handshake). EOF here means the image is not available
        (docs/dnbd3-protocol.md, "Handshake")."""
        request = p.select_image_request(name, rid)
        self._connect()
        return self.handshake(name, rid, request)

    @classmethod
    def attach(cls, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT, where: str = "peer") -> Client:
        """A client on an already connected socket (a socketpair in tests, a proxy connection)."""
        client = cls(where, 0, timeout=timeout)
        client.where = where
        client.sock = sock
        sock.settimeout(timeout)
        return client

    def handshake(self, name: str, rid: int = 0, request: bytes | None = None) -> p.SelectReply:
        """Send SELECT_IMAGE on the connected socket and check the reply."""
        self._send(request or p.select_image_request(name, rid))
        unavailable = f"image {name!r}" + (f" revision {rid}" if rid else "")
        try:
            reply = self._reply(ImageUnavailable)
        except ImageUnavailable as exc:
            # A server closes without a reply when it lacks the image; a silent one is named as such.
            closed = "closed the connection" in str(exc)
            why = (
                "the server closed the connection without a reply"
                if closed
                else str(exc)[len(self.where) + 2 :]
            )
            raise ImageUnavailable(f"{self.where}: {unavailable} is not available ({why})") from None
        if reply.cmd != p.CMD_SELECT_IMAGE:
            raise self._malformed(f"expected a SELECT_IMAGE reply, got {p.command_name(reply.cmd)}")
        if not p.MIN_SELECT_REPLY <= reply.size <= p.MAX_PAYLOAD:
            raise self._malformed(f"SELECT_IMAGE reply announces {reply.size} payload bytes")
        payload = self._recv(reply.size, "the SELECT_IMAGE reply")
        try:
            image = p.parse_select_reply(bytes(payload))
        except p.ProtocolError as exc:
            raise self._malformed(str(exc)) from None
        if image.name != name:
            raise self._malformed(f"server answered for image {image.name!r} instead of {name!r}")
        if rid and image.rid != rid:
            raise self._malformed(f"server answered with revision {image.rid} instead of {rid}")
        if image.size % p.BLOCK_SIZE:
            raise self._malformed(f"image size {image.size} is not a multiple of {p.BLOCK_SIZE}")
        self.image = image
        return image

    def _need_image(self) -> p.SelectReply:
        if self.image is None or self.sock is None:
            raise ConnectionLost(f"{self.where}: no image selected (connection closed)")
        return self.image

    def _reply_for(
        self, cmd: int, pending: dict[int, BlockRequest] | None = None
    ) -> tuple[p.Reply, bytearray]:
        """Read replies until one for `cmd` arrives; block replies for `pending` handles are not allowed
        here."""
        while True:
            reply = self._reply()
            if reply.cmd == cmd:
                limit = self._payload_limit(cmd)
                if reply.size > limit:
                    raise self._malformed(
                        f"{p.command_name(cmd)} reply announces {reply.size} bytes (at most {limit})"
                    )
                return reply, self._recv(reply.size, f"the {p.command_name(cmd)} reply")
            if reply.cmd in (p.CMD_GET_BLOCK, p.CMD_ERROR, p.CMD_SELECT_IMAGE):
                raise self._malformed(f"unexpected {p.command_name(reply.cmd)} reply")
            self._discard(reply)

    def _payload_limit(self, cmd: int) -> int:
        if cmd == p.CMD_GET_CRC32:
            blocks = -(-self._need_image().size // p.HASH_BLOCK_SIZE)
            return (blocks + 1) * 4
        if cmd == p.CMD_GET_SERVERS:
            return p.MAX_PAYLOAD
        return 0

    def _discard(self, reply: p.Reply) -> None:
        """A reply we did not ask for (keepalive, server list, unknown): skip its payload if it is sane."""
        if reply.size > p.MAX_PAYLOAD:
            raise self._malformed(f"unsolicited {p.command_name(reply.cmd)} reply with {reply.size} bytes")
        self._recv(reply.size, "an unsolicited reply")

    def keepalive(self) -> None:
        self._need_image()
        self._send(p.simple_request(p.CMD_KEEPALIVE))
        self._reply_for(p.CMD_KEEPALIVE)

    def crc_list(self) -> bytes:
        """The server's CRC list (master CRC + block CRCs, like the .crc file); b"" if it has none."""
        image = self._need_image()
        self._send(p.simple_request(p.CMD_GET_CRC32))
        _, payload = self._reply_for(p.CMD_GET_CRC32)
        expected = (-(-image.size // p.HASH_BLOCK_SIZE) + 1) * 4
        if payload and len(payload) != expected:
            raise self._malformed(f"CRC list of {len(payload)} bytes, {expected} expected")
        return bytes(payload)

    def servers(self) -> list[p.ServerEntry]:
        self._need_image()
        self._send(p.simple_request(p.CMD_GET_SERVERS))
        _, payload = self._reply_for(p.CMD_GET_SERVERS)
        try:
            return p.parse_servers(bytes(payload))
        except p.ProtocolError as exc:
            raise self._malformed(str(exc)) from None

    def read(self, offset: int, size: int) -> bytes:
        for _, data in self.read_many([(offset, size)]):
            return bytes(data)
        raise AssertionError("unreachable")

    def read_many(
        self, ranges: Iterable[tuple[int, int]], *, window: int = PIPELINE
    ) -> Iterator[tuple[int, memoryview]]:
        """Read byte ranges with up to `window` requests in flight; yields (offset, data) in request order.

        The data views are valid until the next item is requested.
        """
        image = self._need_image()
        pending: dict[int, BlockRequest] = {}
        order: deque[BlockRequest] = deque()
        done: dict[int, bytearray] = {}
        source = iter(ranges)
        exhausted = False
        while True:
            while not exhausted and len(order) < window:
                try:
                    offset, size = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if offset < 0 or size < 0 or offset + size > image.size:
                    raise RangeError(
                        f"{self.where}: range {offset}+{size} lies outside the image of {image.size} bytes"
                    )
                handle = self._next_handle
                self._next_handle = (self._next_handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
                request = BlockRequest(handle, offset, size)
                self._send(p.get_block_request(offset, size, handle))
                pending[handle] = request
                order.append(request)
            if not order:
                return
            head = order[0]
            while head.handle not in done:
                self._block_reply(pending, done)
            order.popleft()
            data = done.pop(head.handle)
            yield head.offset, memoryview(data)

    def _block_reply(self, pending: dict[int, BlockRequest], done: dict[int, bytearray]) -> None:
        reply = self._reply()
        if reply.cmd == p.CMD_GET_BLOCK:
            request = pending.pop(reply.handle, None)
            if request is None:
                raise self._malformed(f"block reply for unknown handle 0x{reply.handle:x}")
            if reply.size != request.size:
                raise self._malformed(f"block reply of {reply.size} bytes for a request of {request.size}")
            done[reply.handle] = self._recv(reply.size, f"{request.size} bytes at offset {request.offset}")
        elif reply.cmd == p.CMD_ERROR:
            request = pending.pop(reply.handle, None)
            if request is None or reply.size:
                raise self._malformed("ERROR reply for an unknown request")
            self.close()  # other requests may still be in flight: this connection is done
            raise RangeError(
                f"{self.where}: server refused the range {request.offset}+{request.size} (past the end)"
            )
        elif reply.cmd == p.CMD_SELECT_IMAGE:
            raise self._malformed("a second SELECT_IMAGE reply")
        else:
            self._discard(reply)


def query_images(server: str, *, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """The server's `/query?q=images` list (loaded images only: docs/dnbd3-protocol.md, "HTTP on the
    same port")."""
    host, port = server_address(server)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/query?q=images", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(16 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise Dnbd3Error(f"{where}: image list query failed: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise Dnbd3Error(f"{where}: image list query answered HTTP {response.status}")
    try:
        data = json.loads(body)
        images = data["images"]
        if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
            raise TypeError("images is not a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise Dnbd3Error(f"{where}: image list is not the expected JSON: {exc}") from None
    return images
