"""Benchmark of `stage4 netboot` (not a test).

Run once: `.venv/bin/python bench/netboot.py -c stage4.toml IMAGE`.

One layered image (built or reused by `stage4 build`), exported twice into a temporary store: revision 1
as it is, revision 2 with a site config.tgz whose unit writes a file in stage 4 before the marker. Booted
on the same accelerator with the same kernel and initramfs:

1. revision 1 as a client with the RAM layer (`stage4 netboot`: HTTP + DNBD3 through qemu's user network,
   xloop, dm snapshot in zram), with the local-disk layer (`--local-disk 4G`: a thin snapshot in a thin
   pool on a virtio disk), and from the local prod file (`stage4 boot --kernel --initrd`,
   root=PARTLABEL on a virtio disk), each --rounds times in A-B-C, C-B-A order. Prints the median times
   to the userspace marker (and every run's) and the ratios of the medians netboot/local
   (target <= 1.2) and disk layer/RAM layer (target <= 1.05), and the bytes the client read over DNBD3
   until the marker against the image size (target <= 30 %).
2. revision 2 on the disk layer and on the RAM layer: the sequential write throughput in the guest
   (dd of WRITE_MIB MiB with fsync onto /), both printed, with their ratio.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from timing import stage4, timed

NAME = "stage4/bench-netboot.qcow2"
WRITE_MIB = 512
# The site's unit: after stage 3's writable-layer unit, before the marker (which powers the guest off).
WRITE_UNIT = """\
[Unit]
Description=bench: sequential write onto /
After=stage4-writable.service
Before=stage4-marker.service

[Service]
Type=oneshot
ExecStart=/bin/sh /usr/local/sbin/bench-write
"""
WRITE_SCRIPT = f"""\
#!/bin/sh
start=$(date +%s%N)
dd if=/dev/zero of=/var/tmp/bench-write bs=1M count={WRITE_MIB} conv=fsync status=none
end=$(date +%s%N)
rm -f /var/tmp/bench-write
echo "<2>STAGE4-BENCH-WRITE bytes=$(({WRITE_MIB} * 1048576)) ns=$((end - start))" > /dev/kmsg
"""


def write_site(path: Path) -> None:
    files = {
        "etc/systemd/system/bench-write.service": (WRITE_UNIT, 0o644),
        "usr/local/sbin/bench-write": (WRITE_SCRIPT, 0o755),
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, (text, mode) in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("etc/systemd/system/multi-user.target.wants/bench-write.service")
        link.type, link.linkname = tarfile.SYMTYPE, "../bench-write.service"
        archive.addfile(link)


def marker_seconds(output: str) -> float:
    return float(re.search(r"marker after (\d+) s", output)[1])


def write_throughput(output: str) -> float:
    """MiB/s of the guest's dd, from the serial log that netboot names."""
    log = Path(output.split("serial log: ")[-1].strip()).read_text(errors="replace")
    found = re.search(r"STAGE4-BENCH-WRITE bytes=(\d+) ns=(\d+)", log)
    if not found:
        sys.exit("the guest printed no STAGE4-BENCH-WRITE line")
    return int(found[1]) / (1 << 20) / (int(found[2]) / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", type=Path, default=Path("stage4.toml"), help="project file")
    parser.add_argument("image", help="a layered image of the project file")
    parser.add_argument(
        "--rounds", type=int, default=3, help="boots of each variant (TCG boot times vary by +-25 %%)"
    )
    args = parser.parse_args()
    output = stage4(args.config, "build", args.image)
    prod = Path(output.split(": ", 1)[1].split(" (")[0])
    with tempfile.TemporaryDirectory(prefix="stage4-bench-netboot-") as tmp:
        store, site = Path(tmp) / "store", Path(tmp) / "site.tgz"
        store.mkdir()
        write_site(site)
        export = [prod, "--store", store, "--name", NAME, "--server", "192.0.2.10"]
        stage4(args.config, "export", *export)
        stage4(args.config, "export", *export, "--config-tgz", site)
        boot = store / ".stage4" / NAME
        image_size = (store / f"{NAME}.r1").stat().st_size
        print(f"{args.image}: revisions 1 and 2, {image_size / (1 << 20):.1f} MiB", flush=True)

        def netboot(rid: int, *options: object) -> str:
            return stage4(args.config, "netboot", store, NAME, "--rid", rid, *options)

        variants = {
            "RAM layer": lambda: netboot(1),
            "local-disk layer": lambda: netboot(1, "--local-disk", "4G"),
            "local boot": lambda: stage4(
                args.config, "boot", prod, "--kernel", boot / "kernel.r1", "--initrd", boot / "initrd.r1"
            ),
        }
        outputs: dict[str, list[str]] = {label: [] for label in variants}
        for round_ in range(args.rounds):
            # A-B-C then C-B-A: a drift of the machine's speed during the run hits every variant alike.
            for label in list(variants) if round_ % 2 == 0 else reversed(variants):
                output, _ = timed(f"round {round_ + 1}: {label} (whole command)", variants[label])
                outputs[label].append(output)
        disk_write, _ = timed(
            "netboot r2 with the write, local-disk layer", lambda: netboot(2, "--local-disk", "4G")
        )
        ram_write, _ = timed("netboot r2 with the write, RAM layer", lambda: netboot(2))
    seconds = {label: [marker_seconds(output) for output in runs] for label, runs in outputs.items()}
    ram_s, disk_s, local_s = (statistics.median(seconds[label]) for label in variants)
    read = statistics.median(int(re.search(r"read (\d+) bytes", out)[1]) for out in outputs["RAM layer"])
    print(f"time to the userspace marker, median of {args.rounds} (all runs):")
    for label, runs in seconds.items():
        print(f"  {label}: {statistics.median(runs):.0f} s ({', '.join(f'{s:.0f}' for s in runs)})")
    print(f"  netboot (RAM layer) / local boot: {ram_s / local_s:.2f} (target <= 1.2)")
    print(f"  local-disk layer / RAM layer: {disk_s / ram_s:.2f} (target <= 1.05)")
    print(
        f"read over DNBD3 until the marker: {read / (1 << 20):.1f} MiB of {image_size / (1 << 20):.1f} MiB "
        f"= {100 * read / image_size:.1f} % (target <= 30 %)"
    )
    disk_mib_s, ram_mib_s = write_throughput(disk_write), write_throughput(ram_write)
    print(
        f"sequential write of {WRITE_MIB} MiB onto / in the guest (fsync): local-disk layer "
        f"{disk_mib_s:.0f} MiB/s, RAM layer {ram_mib_s:.0f} MiB/s, ratio {disk_mib_s / ram_mib_s:.2f}"
    )


if __name__ == "__main__":
    main()
