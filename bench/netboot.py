"""Benchmark of `stage4 netboot` (not a test).

Run once: `.venv/bin/python bench/netboot.py -c stage4.toml IMAGE`.

One revision of a layered image (built or reused by `stage4 build`), exported into a temporary store and
booted twice on the same accelerator with the same kernel and initramfs: as a client (`stage4 netboot`:
HTTP + DNBD3 through qemu's user network, xloop, dm snapshot in RAM) and from the local prod file
(`stage4 boot --kernel --initrd`, root=PARTLABEL on a virtio disk). Prints the time to the userspace
marker of both and their ratio (target <= 1.3), and the bytes the client read over DNBD3 until the marker
against the image size (target <= 30 %).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from timing import timed

NAME = "stage4/bench-netboot.qcow2"


def stage4(project: Path, *args: object) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "stage4", "-c", str(project), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"stage4 {args[0]} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", type=Path, default=Path("stage4.toml"), help="project file")
    parser.add_argument("image", help="a layered image of the project file")
    args = parser.parse_args()
    output = stage4(args.config, "build", args.image)
    prod = Path(output.split(": ", 1)[1].split(" (")[0])
    with tempfile.TemporaryDirectory(prefix="stage4-bench-netboot-") as tmp:
        store = Path(tmp)
        stage4(args.config, "export", prod, "--store", store, "--name", NAME, "--server", "192.0.2.10")
        boot = store / ".stage4" / NAME
        image_size = (store / f"{NAME}.r1").stat().st_size
        print(f"{args.image}: revision 1, {image_size / (1 << 20):.1f} MiB", flush=True)
        net, _ = timed("stage4 netboot (whole command)", lambda: stage4(args.config, "netboot", store, NAME))
        local, _ = timed(
            "stage4 boot --kernel --initrd (whole command)",
            lambda: stage4(
                args.config, "boot", prod, "--kernel", boot / "kernel.r1", "--initrd", boot / "initrd.r1"
            ),
        )
    net_s = float(re.search(r"marker after (\d+) s", net)[1])
    local_s = float(re.search(r"marker after (\d+) s", local)[1])
    read = int(re.search(r"read (\d+) bytes", net)[1])
    print(
        f"time to the userspace marker: netboot {net_s:.0f} s, local boot {local_s:.0f} s, "
        f"ratio {net_s / local_s:.2f} (target <= 1.3)"
    )
    print(
        f"read over DNBD3 until the marker: {read / (1 << 20):.1f} MiB of {image_size / (1 << 20):.1f} MiB "
        f"= {100 * read / image_size:.1f} % (target <= 30 %)"
    )


if __name__ == "__main__":
    main()
