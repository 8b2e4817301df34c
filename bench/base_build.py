#!/usr/bin/env python3
"""Base build: stage4 against plain mmdebstrap with the same packages and mirror, in one run.

stage4's build covers bootstrap, GPT disk, bootloaders and a compressed qcow2; plain mmdebstrap only
the directory tree. Both start without a package cache. Then a second stage4 build of the same base
with one extra package, using the package cache the first one left.

Run as root: .venv/bin/python bench/base_build.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stage4 import api, config
from stage4.builders.base_image import bootstrap_plan
from stage4.context import Context
from stage4.fsutil import remove_tree
from stage4.runner import Runner


def timed(action) -> tuple[float, object]:
    start = time.monotonic()
    result = action()
    return time.monotonic() - start, result


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="stage4-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data = {
            "build": {"output_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache")},
            "images": {"bench": {"distribution": "debian-12"}},
        }
        cfg = config.from_dict(data, "bench")
        plan = bootstrap_plan(Context("bench", cfg.images["bench"], cfg.machine, "bench", tmp, tmp, Runner()))

        plain_dir = tmp / "plain-rootfs"
        plain_argv = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            f"--include={','.join(plan.packages())}",
            plan.distribution.codename,
            str(plain_dir),
            *plan.sources(),
        ]
        plain_seconds, _ = timed(lambda: subprocess.run(plain_argv, check=True, capture_output=True))
        remove_tree(plain_dir)

        stage4_seconds, (result,) = timed(lambda: api.build(cfg, ["bench"]))
        image_mib = result.image.stat().st_size / (1 << 20)

        data["images"]["bench"]["packages"] = ["tree"]
        cfg_plus = config.from_dict(data, "bench")
        plus_seconds, _ = timed(lambda: api.build(cfg_plus, ["bench"]))

    print(f"{'build':52} {'seconds':>8}")
    print(f"{'plain mmdebstrap (directory only)':52} {plain_seconds:8.1f}")
    print(f"{'stage4 base (bootstrap, disk, GRUB, zstd qcow2)':52} {stage4_seconds:8.1f}")
    print(f"{'stage4 base again, one extra package, warm cache':52} {plus_seconds:8.1f}")
    print(f"ratio stage4/mmdebstrap: {stage4_seconds / plain_seconds:.2f} (target <= 0.80)")
    print(f"image size: {image_mib:.0f} MiB (qcow2, zstd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
