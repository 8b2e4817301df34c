"""DNBD3 frames: the byte vectors of the reference (§4.8) and hostile input to every parser."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage4.dnbd3 import protocol as p
from stage4.dnbd3.crc import CrcError, parse_crc_file
from stage4.errors import InputError, Stage4Error
from stage4.image import qcow2


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_select_image_request_matches_verified_bytes():
    expected = h(
        "73 72 02 00 14 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        "03 00 74 65 73 74 2f 69 6d 67 2e 71 63 6f 77 32 00 00 00 00"
    )
    assert p.select_image_request("test/img.qcow2", 0) == expected
    assert len(expected) == 44


def test_select_image_request_computed_vector():
    expected = h(
        "73 72 02 00 10 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
        "03 00 74 65 73 74 2e 71 63 6f 77 32 00 00 00 00"
    )
    assert p.select_image_request("test.qcow2", 0) == expected


def test_select_reply_matches_verified_bytes_and_parses():
    expected = h(
        "73 72 02 00 1b 00 00 00 00 00 00 00 00 00 00 00"
        "03 00 74 65 73 74 2f 69 6d 67 2e 71 63 6f 77 32 00 02 00 00 00 86 02 00 00 00 00"
    )
    assert p.select_reply(3, "test/img.qcow2", 2, 42_336_256) == expected
    reply = p.parse_reply(expected[:16])
    assert (reply.cmd, reply.size, reply.handle) == (p.CMD_SELECT_IMAGE, 27, 0)
    assert p.parse_select_reply(expected[16:]) == p.SelectReply(3, "test/img.qcow2", 2, 42_336_256)


def test_select_reply_ten_gib_vector():
    expected = h(
        "73 72 02 00 17 00 00 00 00 00 00 00 00 00 00 00"
        "03 00 74 65 73 74 2e 71 63 6f 77 32 00 07 00 00 00 00 80 02 00 00 00"
    )
    assert p.select_reply(3, "test.qcow2", 7, 10 << 30) == expected


@pytest.mark.parametrize(
    ("offset", "size", "handle", "expected"),
    [
        (0, 4096, 1, "73 72 01 00 00 10 00 00 00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00"),
        (
            1 << 20,
            64 << 10,
            0x1122334455667788,
            "73 72 01 00 00 00 01 00 00 00 10 00 00 00 00 00 88 77 66 55 44 33 22 11",
        ),
    ],
)
def test_get_block_request_vectors(offset, size, handle, expected):
    assert p.get_block_request(offset, size, handle) == h(expected)


def test_reply_and_simple_request_vectors():
    assert p.Reply(p.CMD_GET_BLOCK, 4096, 1).pack() == h("73 72 01 00 00 10 00 00 01 00 00 00 00 00 00 00")
    assert p.Reply(p.CMD_ERROR, 0, 0x112233445566770A).pack() == h(
        "73 72 04 00 00 00 00 00 0a 77 66 55 44 33 22 11"
    )
    assert p.simple_request(p.CMD_KEEPALIVE) == h("73 72 05 00") + bytes(20)
    assert p.simple_request(p.CMD_GET_SERVERS) == h("73 72 03 00") + bytes(20)
    assert p.simple_request(p.CMD_GET_CRC32) == h("73 72 08 00") + bytes(20)
    keepalive = p.Reply(p.CMD_KEEPALIVE, 0, 0x1111).pack()
    assert keepalive == h("73 72 05 00 00 00 00 00 11 11 00 00 00 00 00 00")


def test_server_entry_vectors():
    assert p.ServerEntry("127.0.0.2", 15010).pack() == h("7f 00 00 02") + bytes(12) + h("3a a2 02 00")
    assert p.ServerEntry("::1", 5003).pack() == bytes(15) + h("01") + h("13 8b 0a 00")
    assert p.ServerEntry("10.0.0.1", 5003).pack() == h("0a 00 00 01") + bytes(12) + h("13 8b 02 00")
    payload = p.ServerEntry("10.0.0.1", 5003).pack() + bytes(20) + p.ServerEntry("::1", 5003).pack()
    assert p.parse_servers(payload) == [p.ServerEntry("10.0.0.1", 5003), p.ServerEntry("::1", 5003)]


def test_byte_swapped_magic_is_refused():
    with pytest.raises(p.ProtocolError, match=r"^bad magic 0x7372 in reply$"):
        p.parse_reply(h("72 73 05 00 00 00 00 00") + bytes(8))
    with pytest.raises(p.ProtocolError, match=r"^bad magic 0x7372 in request$"):
        p.parse_request(h("72 73 05 00") + bytes(20))


def test_select_image_payload_is_parsed_as_leniently_as_the_server():
    base = struct.pack("<H", 3) + b"img\0" + struct.pack("<H", 5)
    assert p.parse_select_image(base) == p.SelectImage(3, "img", 5, 0)  # flags omitted
    assert p.parse_select_image(base + b"\x07trailing") == p.SelectImage(3, "img", 5, 7)
    assert p.parse_select_image(struct.pack("<H", 3) + b"img").rid == 0  # name without NUL at the end
    for bad, message in (
        (struct.pack("<H", 3), r"^incomplete SELECT_IMAGE payload$"),
        (struct.pack("<H", 3) + b"\0\0\0\0", r"^empty image name$"),
        (bytes(1001), r"^SELECT_IMAGE payload of 1001 bytes exceeds 1000$"),
    ):
        with pytest.raises(p.ProtocolError, match=message):
            p.parse_select_image(bad)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (  # RID 0
            struct.pack("<H", 3) + b"img\0" + struct.pack("<HQ", 0, 8192),
            r"^server did not supply a revision id$",
        ),
        (  # version 1
            struct.pack("<H", 1) + b"img\0" + struct.pack("<HQ", 1, 8192),
            r"^server speaks protocol version 1, at least 2 needed$",
        ),
        (  # size below 4096
            struct.pack("<H", 3) + b"img\0" + struct.pack("<HQ", 1, 100),
            r"^SELECT_IMAGE reply: image size 100 is below 4096$",
        ),
        (  # no NUL anywhere after the version (a packed RID/size would bring its own zero bytes)
            struct.pack("<H", 3) + b"img" + b"\1" * 10,
            r"^SELECT_IMAGE reply: image name is not NUL-terminated$",
        ),
        (  # empty name
            struct.pack("<H", 3) + b"\0" + struct.pack("<HQ", 1, 8192) + b"xx",
            r"^SELECT_IMAGE reply: empty image name$",
        ),
        (  # cut after the name
            struct.pack("<H", 3) + b"abcdefghij\0" + b"\1",
            r"^SELECT_IMAGE reply: too short for revision and size$",
        ),
    ],
)
def test_bad_select_replies_are_refused(payload, message):
    with pytest.raises(p.ProtocolError, match=message):
        p.parse_select_reply(payload)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", ("host", 5003)),
        ("host:1234", ("host", 1234)),
        ("[::1]:99", ("::1", 99)),
        ("::1", ("::1", 5003)),
        ("10.0.0.1", ("10.0.0.1", 5003)),
    ],
)
def test_parse_address(text, expected):
    assert p.parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("host:0", "port must be 1..65535"),
        ("host:70000", "port must be 1..65535"),
        ("host:x", "port must be 1..65535"),
        (":5003", "no host"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':port' after ']'"),
    ],
)
def test_parse_address_refuses(text, problem):
    with pytest.raises(InputError, match="^" + re.escape(f"server address {text!r}: {problem}") + "$"):
        p.parse_address(text)


# --- hostile input: every parser either returns a value or raises a Stage4Error -------------------------

PARSERS = [
    p.parse_reply,
    p.parse_request,
    p.parse_select_reply,
    p.parse_select_image,
    p.parse_servers,
    parse_crc_file,
    qcow2.parse_header,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=1100),
        st.builds(lambda tail: b"sr" + tail, st.binary(max_size=40)),
        st.builds(
            lambda v, name, tail: struct.pack("<H", v) + name + b"\0" + tail,
            st.integers(0, 65535),
            st.binary(max_size=30),
            st.binary(max_size=12),
        ),
        st.builds(lambda tail: b"QFI\xfb" + tail, st.binary(max_size=120)),
    )
)
def test_parsers_never_crash(data):
    for parse in PARSERS:
        try:
            parse(data)
        except Stage4Error:
            pass


@settings(max_examples=200, deadline=None)
@given(
    version=st.integers(2, 65535),
    name=st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s),
    rid=st.integers(1, 65535),
    size=st.integers(4096, (1 << 64) - 1),
)
def test_select_reply_roundtrip(version, name, rid, size):
    frame = p.select_reply(version, name, rid, size)
    reply = p.parse_reply(frame[:16])
    assert reply.size == len(frame) - 16
    assert p.parse_select_reply(frame[16:]) == p.SelectReply(version, name, rid, size)


def test_crc_list_with_bad_master_is_refused():
    good = h("19 01 66 5f 4a a1 7c a4")
    assert parse_crc_file(good, 16 << 20) == [0xA47CA14A]
    with pytest.raises(CrcError, match=r"^master CRC 0x5f660118 does not match the list \(0x5f660119\)$"):
        parse_crc_file(b"\x18" + good[1:])
    with pytest.raises(CrcError, match=r"^CRC list has 8 bytes, 12 expected for an image of 33554432 bytes$"):
        parse_crc_file(good, 32 << 20)  # too short for two blocks
