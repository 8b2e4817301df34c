"""`stage4 dnbd3 verify` and `stage4 dnbd3 get`: check a published image the way a client reads it, over the
protocol rather than the image list, which shows only loaded images (docs/dnbd3-store.md, "How the server
notices new images").

verify: select the image, compare its size with the published file, compare the server's CRC list with
the local `.crc`, read every (or a sample of) 16 MiB hash block over the protocol, compare the bytes with
the published file and their CRC with the list, then report what a client would find: the qcow2
header, the GPT and the root partition named by the identifier, and its filesystem label.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypedDict

from stage4.config import DEFAULT_IDENTIFIER
from stage4.dnbd3 import diskview
from stage4.dnbd3.client import Client, ConnectionLost, Dnbd3Error, query_images
from stage4.dnbd3.crc import CrcError, parse_crc_file
from stage4.dnbd3.protocol import HASH_BLOCK_SIZE, SelectReply, virtual_size
from stage4.dnbd3.store import META_DIR, validate_name
from stage4.errors import InputError, Stage4Error
from stage4.image import qcow2

CHUNK = 1 << 20
MAX_PROBLEMS = 20
Progress = Callable[[int, int], None]


class VerifyReportDict(TypedDict):
    server: str
    name: str
    rid: int
    size: int
    passed: bool
    blocks_checked: int
    blocks_total: int
    facts: list[str]
    problems: list[str]


@dataclass
class VerifyReport:
    server: str
    name: str
    rid: int = 0
    size: int = 0
    facts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    blocks_checked: int = 0
    blocks_total: int = 0

    @property
    def passed(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("... more problems not shown")

    def to_dict(self) -> VerifyReportDict:
        return {
            "server": self.server,
            "name": self.name,
            "rid": self.rid,
            "size": self.size,
            "passed": self.passed,
            "blocks_checked": self.blocks_checked,
            "blocks_total": self.blocks_total,
            "facts": self.facts,
            "problems": self.problems,
        }


def _block_range(index: int, size: int) -> tuple[int, int]:
    start = index * HASH_BLOCK_SIZE
    return start, min(HASH_BLOCK_SIZE, size - start)


def _selected(client: Client) -> SelectReply:
    """The image `Client.open` selected (set by the handshake, kept after close)."""
    image = client.image
    assert image is not None
    return image


def _local_bytes(handle: BinaryIO, real_size: int, offset: int, size: int) -> bytes:
    data = (
        os.pread(handle.fileno(), max(0, min(size, real_size - offset)), offset)
        if offset < real_size
        else b""
    )
    return data + bytes(size - len(data))


def verify(
    server: str,
    name: str,
    rid: int = 0,
    *,
    store: Path | None = None,
    published: Path | None = None,
    sample: int | None = None,
    identifier: str | None = None,
    timeout: float = 10.0,
    progress: Progress | None = None,
    seed: int | None = None,
) -> VerifyReport:
    validate_name(name)
    report = VerifyReport(server, name)
    client = Client.open(server, name, rid, timeout=timeout)
    try:
        image = _selected(client)
        report.rid, report.size = image.rid, image.size
        report.facts.append(
            f"server {client.where} serves {image.name}:{image.rid}, {image.size} bytes "
            f"(protocol version {image.version})"
        )
        record: dict[str, Any] | None = None  # the publication record (free-form JSON)
        if store is not None:
            published = published or Path(store) / f"{name}.r{image.rid}"
            record_path = Path(store) / META_DIR / name / f"publication.r{image.rid}.json"
            if record_path.is_file():
                record = json.loads(record_path.read_text(encoding="utf-8"))
        identifier = identifier or (record or {}).get("identifier") or DEFAULT_IDENTIFIER
        local_crc = None
        if published is not None:
            if not published.is_file():
                raise InputError(f"{published}: no such published image")
            real = published.stat().st_size
            if virtual_size(real) != image.size:
                report.problem(
                    f"size: server announces {image.size} bytes, {published} has {real} "
                    f"({virtual_size(real)} rounded to 4 KiB)"
                )
            crc_path = published.with_name(published.name + ".crc")
            if crc_path.is_file():
                local_crc = crc_path.read_bytes()

        crc_list = _check_crc_lists(client, report, local_crc)
        blocks = -(-image.size // HASH_BLOCK_SIZE)
        report.blocks_total = blocks
        chosen = list(range(blocks))
        if sample is not None and sample < blocks:
            rng = random.Random(seed)
            middle = rng.sample(range(1, blocks - 1), max(0, min(sample - 2, blocks - 2)))
            chosen = sorted({0, blocks - 1, *middle}) if sample >= 2 else [0]
        handle = published.open("rb") if published is not None else None
        try:
            client = _check_blocks(
                client,
                server,
                name,
                image.rid,
                timeout,
                chosen,
                crc_list,
                handle,
                published,
                report,
                progress,
            )
        finally:
            if handle is not None:
                handle.close()
        _describe_contents(client, report, identifier)
        try:
            client.keepalive()
            report.facts.append("KEEPALIVE answered")
        except Dnbd3Error as exc:
            report.problem(f"KEEPALIVE: {exc}")
        servers = client.servers()
        report.facts.append(
            "alternative servers: " + (", ".join(f"{s.host}:{s.port}" for s in servers) or "none")
        )
    finally:
        client.close()
    try:
        listed = [
            i
            for i in query_images(server, timeout=timeout)
            if i.get("name") == name and i.get("rid") == report.rid
        ]
        report.facts.append("listed by /query?q=images" if listed else "not listed by /query?q=images")
        for entry in listed:
            if entry.get("complete", 100) != 100 or entry.get("problems", 0):
                report.problem(
                    f"/query shows complete={entry.get('complete')} problems={entry.get('problems')} "
                    "(a failed hash block?)"
                )
    except Dnbd3Error as exc:
        report.facts.append(f"image list not available: {exc}")
    return report


def _check_crc_lists(client: Client, report: VerifyReport, local_crc: bytes | None) -> list[int] | None:
    served = client.crc_list()
    crcs = None
    if served:
        try:
            crcs = parse_crc_file(served, _selected(client).size)
            report.facts.append(f"server CRC list: {len(crcs)} blocks, master CRC consistent")
        except CrcError as exc:
            report.problem(f"server CRC list: {exc}")
    elif local_crc is not None:
        report.problem(
            "server sends no CRC list although a .crc is published: it discarded it (wrong master CRC "
            "or too short; docs/dnbd3-store.md, 'CRC file')"
        )
    else:
        report.facts.append("no CRC list published")
    if local_crc is not None:
        try:
            local_list = parse_crc_file(local_crc, _selected(client).size)
        except CrcError as exc:
            report.problem(f"published .crc: {exc}")
            local_list = None
        if served and served != local_crc:
            report.problem("server CRC list differs from the published .crc")
        crcs = crcs or local_list
    return crcs


def _check_blocks(
    client: Client,
    server: str,
    name: str,
    rid: int,
    timeout: float,
    chosen: list[int],
    crcs: list[int] | None,
    handle: BinaryIO | None,
    published: Path | None,
    report: VerifyReport,
    progress: Progress | None,
) -> Client:
    size = _selected(client).size
    real = published.stat().st_size if published is not None else 0
    for done, index in enumerate(chosen):
        start, length = _block_range(index, size)
        where = f"block {index} (bytes {start}..{start + length - 1})"
        ranges = [(o, min(CHUNK, start + length - o)) for o in range(start, start + length, CHUNK)]
        crc, differs = 0, None
        try:
            for offset, data in client.read_many(ranges):
                crc = zlib.crc32(data, crc)
                if handle is not None and differs is None:
                    expected = _local_bytes(handle, real, offset, len(data))
                    if data != expected:
                        at = next(i for i in range(len(data)) if data[i] != expected[i])
                        differs = offset + at
        except ConnectionLost as exc:
            report.problem(
                f"{where}: the server closed the connection while serving it ({exc}); "
                "a failed hash check on the server?"
            )
            client.close()
            client = Client.open(server, name, rid, timeout=timeout)
            continue
        if differs is not None:
            report.problem(f"{where}: served data differ from {published} at byte {differs}")
        if crcs is not None and index < len(crcs) and crc != crcs[index]:
            report.problem(
                f"{where}: CRC-32 of the served data is 0x{crc:08x}, the CRC list says 0x{crcs[index]:08x}"
            )
        report.blocks_checked += 1
        if progress:
            progress(done + 1, len(chosen))
    return client


def _describe_contents(client: Client, report: VerifyReport, identifier: str) -> None:
    size = _selected(client).size

    def read(offset: int, length: int) -> bytes:
        return client.read(offset, length) if length else b""

    try:
        facts = qcow2.parse_header(read(0, min(4096, size)))
        if facts is None:
            report.problem("not a qcow2 image (no QFI\\xfb magic at offset 0): xloop cannot open it")
            return
        report.facts.append(facts.describe())
        for item in facts.problems():
            report.problem(f"qcow2: {item}")
        disk = diskview.Qcow2Disk(read, facts, size)
        parts = diskview.gpt_partitions(disk.read, facts.virtual_size)
        report.facts.append("GPT partitions: " + ", ".join(f"{p.number}:{p.name or '-'}" for p in parts))
        root = next((p for p in parts if p.name == identifier), None)
        if root is None:
            report.problem(
                f"no partition named {identifier!r}: root=PARTLABEL={identifier} would not be found"
            )
            return
        fs_type, label = diskview.filesystem(disk.read, root)
        report.facts.append(
            f"root partition {root.number} {identifier!r}: {root.size} bytes at {root.offset}, "
            f"filesystem {fs_type or 'unknown'}, label {label!r}"
        )
        if label != identifier:
            report.facts.append(
                f"note: filesystem label {label!r} differs from the identifier (LABEL= would not match)"
            )
    except (diskview.DiskError, qcow2.Qcow2Error) as exc:
        report.problem(f"image contents: {exc}")


def download(
    server: str,
    name: str,
    output: Path,
    rid: int = 0,
    *,
    timeout: float = 10.0,
    progress: Progress | None = None,
) -> tuple[int, int, str]:
    """Download an image to `output` (virtual size, zero padding included), checking block CRCs if the
    server has a list. Returns (rid, size, sha256). Written to a temporary name, renamed at the end."""
    validate_name(name)
    output = Path(output)
    temp = output.with_name(f".{output.name}.stage4-get.part")
    with Client.open(server, name, rid, timeout=timeout) as client:
        image = _selected(client)
        size = image.size
        served = client.crc_list()
        crcs = parse_crc_file(served, size) if served else None
        digest = hashlib.sha256()
        try:
            with temp.open("wb") as out:
                block, crc = 0, 0
                ranges = ((o, min(CHUNK, size - o)) for o in range(0, size, CHUNK))
                try:
                    for offset, data in client.read_many(ranges):
                        out.write(data)
                        digest.update(data)
                        crc = zlib.crc32(data, crc)
                        end = offset + len(data)
                        if end % HASH_BLOCK_SIZE == 0 or end == size:
                            if crcs is not None and crc != crcs[block]:
                                start = block * HASH_BLOCK_SIZE
                                raise Stage4Error(
                                    f"{name}:{image.rid} block {block} (bytes {start}..{end - 1}): "
                                    f"CRC-32 0x{crc:08x}, the server's list says 0x{crcs[block]:08x}"
                                )
                            block, crc = block + 1, 0
                        if progress:
                            progress(end, size)
                except ConnectionLost as exc:
                    refused = _refused_block(server, name, image.rid, block, size, timeout)
                    if refused is None:
                        raise
                    start = refused * HASH_BLOCK_SIZE
                    last = min(start + HASH_BLOCK_SIZE, size) - 1
                    raise Stage4Error(
                        f"{name}:{image.rid} block {refused} (bytes {start}..{last}): the "
                        "server closes the connection on every read of it: a failed hash check on "
                        f"the server ({exc})"
                    ) from None
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, output)
        finally:
            if temp.exists():
                temp.unlink()
        return image.rid, size, digest.hexdigest()


def _refused_block(server: str, name: str, rid: int, first: int, size: int, timeout: float) -> int | None:
    """The first hash block from `first` on whose reads the server answers by closing the connection.

    Pipelined replies that were sent before the close can be lost with it, so the block being received
    when the connection broke is not necessarily the refused one: probe each with a one-byte read.
    """
    for index in range(first, -(-size // HASH_BLOCK_SIZE)):
        try:
            with Client.open(server, name, rid, timeout=timeout) as probe:
                probe.read(index * HASH_BLOCK_SIZE, 1)
        except ConnectionLost:
            return index
        except Dnbd3Error:
            return None
    return None
