"""The DNBD3 wire protocol: constants, frame packing and parsing.

Pure functions only, no I/O. Every parser checks every length before it reads, and raises ProtocolError
(a Stage4Error) for anything malformed, so a hostile peer can never cause an IndexError, a huge allocation
or an out-of-range read. Layouts as in docs/dnbd3-protocol.md (all little-endian, except the port inside a
server entry, which is big-endian).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from stage4.errors import Stage4Error

DEFAULT_PORT = 5003
PROTOCOL_VERSION = 3
MIN_SUPPORTED_VERSION = 2
MAX_PAYLOAD = 1000
BLOCK_SIZE = 4096
HASH_BLOCK_SIZE = 16 << 20
MAX_RID = 65535
MAX_SERVERS = 8
OFFSET_MASK = (1 << 56) - 1

MAGIC = 0x7273
MAGIC_BYTES = b"sr"

CMD_GET_BLOCK = 1
CMD_SELECT_IMAGE = 2
CMD_GET_SERVERS = 3
CMD_ERROR = 4
CMD_KEEPALIVE = 5
CMD_LATEST_RID = 6
CMD_SET_CLIENT_MODE = 7
CMD_GET_CRC32 = 8

COMMAND_NAMES = {
    CMD_GET_BLOCK: "GET_BLOCK",
    CMD_SELECT_IMAGE: "SELECT_IMAGE",
    CMD_GET_SERVERS: "GET_SERVERS",
    CMD_ERROR: "ERROR",
    CMD_KEEPALIVE: "KEEPALIVE",
    CMD_LATEST_RID: "LATEST_RID",
    CMD_SET_CLIENT_MODE: "SET_CLIENT_MODE",
    CMD_GET_CRC32: "GET_CRC32",
}

REQUEST = struct.Struct("<HHIQQ")  # magic, cmd, size, offset, handle
REPLY = struct.Struct("<HHIQ")  # magic, cmd, size, handle
REQUEST_SIZE = REQUEST.size  # 24
REPLY_SIZE = REPLY.size  # 16
SERVER_ENTRY_SIZE = 20
HOST_TYPE_IPV4 = 2
HOST_TYPE_IPV6 = 10

# A select reply payload: version (2) + name (>= 1 byte) + NUL (1) + rid (2) + size (8) = 13 bytes or more.
MIN_SELECT_REPLY = 13


class ProtocolError(Stage4Error):
    """A frame that does not follow the DNBD3 protocol."""


def virtual_size(real_size: int) -> int:
    """The size the server announces: the file size rounded up to a multiple of 4096."""
    return -(-real_size // BLOCK_SIZE) * BLOCK_SIZE


def command_name(cmd: int) -> str:
    return COMMAND_NAMES.get(cmd, f"cmd {cmd}")


@dataclass(frozen=True)
class Request:
    cmd: int
    size: int = 0
    offset: int = 0
    handle: int = 0

    def pack(self) -> bytes:
        return REQUEST.pack(MAGIC, self.cmd, self.size, self.offset, self.handle)


@dataclass(frozen=True)
class Reply:
    cmd: int
    size: int
    handle: int

    def pack(self) -> bytes:
        return REPLY.pack(MAGIC, self.cmd, self.size, self.handle)


def parse_request(data: bytes | bytearray | memoryview) -> Request:
    if len(data) != REQUEST_SIZE:
        raise ProtocolError(f"request header has {len(data)} bytes, expected {REQUEST_SIZE}")
    magic, cmd, size, offset, handle = REQUEST.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x} in request")
    return Request(cmd, size, offset, handle)


def parse_reply(data: bytes | bytearray | memoryview) -> Reply:
    if len(data) != REPLY_SIZE:
        raise ProtocolError(f"reply header has {len(data)} bytes, expected {REPLY_SIZE}")
    magic, cmd, size, handle = REPLY.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x} in reply")
    return Reply(cmd, size, handle)


def get_block_request(offset: int, size: int, handle: int) -> bytes:
    if not 0 <= offset <= OFFSET_MASK:
        raise ProtocolError(f"offset {offset} does not fit into 56 bits")
    if not 0 <= size <= 0xFFFFFFFF:
        raise ProtocolError(f"read size {size} does not fit into 32 bits")
    return Request(CMD_GET_BLOCK, size, offset, handle & 0xFFFFFFFFFFFFFFFF).pack()


def simple_request(cmd: int) -> bytes:
    """A request without payload (KEEPALIVE, GET_SERVERS, GET_CRC32): size 0, or the server desynchronises
    (docs/dnbd3-protocol.md, "Payloads")."""
    return Request(cmd).pack()


# --- SELECT_IMAGE -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectImage:
    version: int
    name: str
    rid: int
    flags: int = 0


@dataclass(frozen=True)
class SelectReply:
    version: int
    name: str
    rid: int
    size: int


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise ProtocolError("image name contains a NUL byte")
    return raw


def select_image_request(name: str, rid: int, *, version: int = PROTOCOL_VERSION, flags: int = 0) -> bytes:
    if not 0 <= rid <= MAX_RID:
        raise ProtocolError(f"revision {rid} is outside 0..{MAX_RID}")
    payload = struct.pack("<H", version) + _encode_name(name) + b"\0" + struct.pack("<HB", rid, flags)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"image name too long for a {MAX_PAYLOAD}-byte payload")
    return Request(CMD_SELECT_IMAGE, len(payload)).pack() + payload


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("image name is not UTF-8") from None


def parse_select_image(payload: bytes) -> SelectImage:
    """Parse a SELECT_IMAGE payload as leniently as the real server (docs/dnbd3-protocol.md, "Handshake")."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"SELECT_IMAGE payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if len(payload) < 3:
        raise ProtocolError("incomplete SELECT_IMAGE payload")
    (version,) = struct.unpack_from("<H", payload, 0)
    rest = bytes(payload[2:])
    nul = rest.find(b"\0")
    if nul < 0:
        name_raw, tail = rest, b""  # name is the last thing in the payload: the server takes RID 0
    else:
        name_raw, tail = rest[:nul], rest[nul + 1 :]
    rid = struct.unpack_from("<H", tail, 0)[0] if len(tail) >= 2 else 0
    flags = tail[2] if len(tail) >= 3 else 0
    if not name_raw:
        raise ProtocolError("empty image name")
    return SelectImage(version, _decode_name(name_raw), rid, flags)


def select_reply(version: int, name: str, rid: int, size: int) -> bytes:
    payload = struct.pack("<H", version) + _encode_name(name) + b"\0" + struct.pack("<HQ", rid, size)
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"image name too long for a {MAX_PAYLOAD}-byte payload")
    return Reply(CMD_SELECT_IMAGE, len(payload), 0).pack() + payload


def parse_select_reply(payload: bytes) -> SelectReply:
    """Parse and check a SELECT_IMAGE reply payload: version >= 2, a name, RID != 0, size >= 4096."""
    if not MIN_SELECT_REPLY <= len(payload) <= MAX_PAYLOAD:
        raise ProtocolError(
            f"SELECT_IMAGE reply payload has {len(payload)} bytes, expected {MIN_SELECT_REPLY}..{MAX_PAYLOAD}"
        )
    (version,) = struct.unpack_from("<H", payload, 0)
    nul = payload.find(b"\0", 2)
    if nul < 0:
        raise ProtocolError("SELECT_IMAGE reply: image name is not NUL-terminated")
    name_raw = bytes(payload[2:nul])
    if len(payload) - (nul + 1) < 10:
        raise ProtocolError("SELECT_IMAGE reply: too short for revision and size")
    rid, size = struct.unpack_from("<HQ", payload, nul + 1)
    if version < MIN_SUPPORTED_VERSION:
        raise ProtocolError(f"server speaks protocol version {version}, at least {MIN_SUPPORTED_VERSION} needed")
    if not name_raw:
        raise ProtocolError("SELECT_IMAGE reply: empty image name")
    if rid == 0:
        raise ProtocolError("server did not supply a revision id")
    if size < BLOCK_SIZE:
        raise ProtocolError(f"SELECT_IMAGE reply: image size {size} is below {BLOCK_SIZE}")
    return SelectReply(version, _decode_name(name_raw), rid, size)


# --- GET_SERVERS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerEntry:
    host: str
    port: int
    failures: int = 0

    def pack(self) -> bytes:
        address = ipaddress.ip_address(self.host)
        kind = HOST_TYPE_IPV4 if address.version == 4 else HOST_TYPE_IPV6
        return address.packed.ljust(16, b"\0") + struct.pack(">H", self.port) + bytes([kind, self.failures & 0xFF])


def parse_servers(payload: bytes) -> list[ServerEntry]:
    """Parse a GET_SERVERS payload; empty (type 0) entries are skipped."""
    if len(payload) % SERVER_ENTRY_SIZE:
        raise ProtocolError(f"GET_SERVERS payload of {len(payload)} bytes is not a multiple of {SERVER_ENTRY_SIZE}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"GET_SERVERS payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    entries = []
    for start in range(0, len(payload), SERVER_ENTRY_SIZE):
        entry = payload[start : start + SERVER_ENTRY_SIZE]
        (port,) = struct.unpack_from(">H", entry, 16)
        kind, failures = entry[18], entry[19]
        if kind == HOST_TYPE_IPV4:
            host = str(ipaddress.IPv4Address(bytes(entry[:4])))
        elif kind == HOST_TYPE_IPV6:
            host = str(ipaddress.IPv6Address(bytes(entry[:16])))
        elif kind == 0:
            continue
        else:
            raise ProtocolError(f"GET_SERVERS entry with unknown address type {kind}")
        entries.append(ServerEntry(host, port, failures))
    return entries


# --- server addresses on the command line -----------------------------------------------------------------


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address -> (host, port)."""
    from stage4.errors import InputError

    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InputError(f"server address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InputError(f"server address {text!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise InputError(f"server address {text!r}: no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InputError(f"server address {text!r}: port must be 1..65535")
        return host, int(port_text)
    return host, default_port
