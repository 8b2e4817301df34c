"""Benchmark of `stage4 export` and the DNBD3 client (not a test).

Run once: `.venv/bin/python bench/export.py`.

On one file of real, non-zero data (default 1 GiB, repeated random 16 MiB chunks, size not a multiple of
4096 so the padding path runs): export time vs plain `cp` (and `cp` + sync, since export fsyncs), CRC
throughput alone, and client read throughput from `stage4 serve` on loopback vs `cat` of the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from stage4.dnbd3.client import Client
from stage4.dnbd3.crc import block_crcs
from stage4.dnbd3.server import DevServer
from stage4.export.publish import publish

MiB = 1 << 20


def timed(func) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def make_file(path: Path, size: int) -> None:
    chunks = [os.urandom(16 * MiB) for _ in range(4)]
    with path.open("wb") as handle:
        written = 0
        index = 0
        while written < size:
            data = chunks[index % len(chunks)][: size - written]
            handle.write(data)
            written += len(data)
            index += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    size = args.size_mib * MiB + 1234
    with tempfile.TemporaryDirectory(prefix="stage4-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        source = work / "source.img"
        make_file(source, size)
        subprocess.run(["sync"], check=True)
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache

        rows: list[tuple[str, float, str]] = []

        t_cp = timed(lambda: subprocess.run(["cp", str(source), str(work / "copy")], check=True))
        t_cp_sync = t_cp + timed(lambda: subprocess.run(["sync", str(work / "copy")], check=True))
        (work / "copy").unlink()
        subprocess.run(["sync"], check=True)
        store = work / "store"
        store.mkdir()
        t_export = timed(lambda: publish(source, store, "bench/img", check_image=False, boot_files=False))
        rows.append(("cp", t_cp, ""))
        rows.append(("cp + sync", t_cp_sync, ""))
        rows.append(
            (
                "stage4 export (copy+CRC+sha256+fsync)",
                t_export,
                f"{t_export / t_cp:.2f}x cp, {t_export / t_cp_sync:.2f}x cp+sync (target <= 1.3x cp)",
            )
        )

        with source.open("rb") as handle:
            import mmap

            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            t_crc = timed(lambda: block_crcs(mapped))
            view = memoryview(mapped)
            t_raw = timed(lambda: zlib.crc32(view))
            view.release()
            mapped.close()
        rows.append(
            ("CRC list (block_crcs over mmap)", t_crc, f"{size / t_crc / 1e9:.2f} GB/s (target >= 1 GB/s)")
        )
        rows.append(("zlib.crc32 over the whole mmap", t_raw, f"{size / t_raw / 1e9:.2f} GB/s"))

        published = store / "bench/img.r1"
        t_cat = timed(lambda: subprocess.run(["cat", str(published)], stdout=subprocess.DEVNULL, check=True))
        with DevServer(store) as server:
            host, port = server.address

            def read_all() -> None:
                with Client.open(f"{host}:{port}", "bench/img", timeout=30) as client:
                    total = client.image.size
                    ranges = ((o, min(MiB, total - o)) for o in range(0, total, MiB))
                    for _ in client.read_many(ranges, window=16):
                        pass

            t_client = timed(read_all)
        rows.append(("cat of the published file", t_cat, f"{size / t_cat / 1e9:.2f} GB/s"))
        rows.append(
            (
                "client read via stage4 serve (loopback)",
                t_client,
                f"{size / t_client / 1e9:.2f} GB/s, {t_client / t_cat:.2f}x cat",
            )
        )

        print(
            f"\nfile: {size} bytes ({size / MiB:.0f} MiB), {os.cpu_count()} CPUs, "
            f"python {sys.version.split()[0]}"
        )
        width = max(len(r[0]) for r in rows)
        print(f"{'what':<{width}}  {'seconds':>8}  notes")
        for name, seconds, note in rows:
            print(f"{name:<{width}}  {seconds:8.3f}  {note}")
        shutil.rmtree(store)


if __name__ == "__main__":
    main()
