#!/usr/bin/env python3
"""Base build: stage4 against plain mmdebstrap with the same packages and mirror, in one run.

stage4's build covers bootstrap, GPT disk, bootloaders and a compressed qcow2; plain mmdebstrap only
the directory tree. Both start without a package cache (each stage4 build in output and cache folders of
its own), in the order mmdebstrap, stage4, stage4, mmdebstrap; the ratio is that of the means. Then the
same base with one more package each time, using the package cache the last stage4 build left, in the
order A-B-B-A: A the old way (`--rebuild base`: a bootstrap from scratch), B the new way (the kept tree
of the previous build, updated; issue 19).

Run as root: .venv/bin/python bench/base_build.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import timed

from stage4 import api, config
from stage4.builders.base_image import bootstrap_plan
from stage4.context import Context
from stage4.fsutil import remove_tree
from stage4.runner import Runner

# One more each time (small, nothing in them the initramfs takes in).
EXTRA = ("tree", "pv", "ncdu", "bc")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="stage4-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data: dict = {"images": {"bench": {"distribution": "debian-12"}}}
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
        runs: dict[str, list[float]] = {"mmdebstrap": [], "stage4": []}
        for round_, tool in enumerate(("mmdebstrap", "stage4", "stage4", "mmdebstrap"), start=1):
            label = f"round {round_}: {tool}"
            if tool == "mmdebstrap":
                _, seconds = timed(label, lambda: subprocess.run(plain_argv, check=True, capture_output=True))
                remove_tree(plain_dir)
            else:
                # Fresh output and package cache: a build from nothing, as every mmdebstrap run is.
                data["build"] = {
                    "output_dir": str(tmp / f"out{round_}"),
                    "cache_dir": str(tmp / f"cache{round_}"),
                }
                cfg = config.from_dict(data, "bench")
                (result,), seconds = timed(label, lambda c=cfg: api.build(c, ["bench"]))
                image_mib = result.image.stat().st_size / (1 << 20)
            runs[tool].append(seconds)
        plain_seconds, stage4_seconds = (sum(runs[tool]) / 2 for tool in ("mmdebstrap", "stage4"))

        plus: dict[str, list[float]] = {"A": [], "B": []}
        for count, way in enumerate("ABBA", start=1):
            data["images"]["bench"]["packages"] = list(EXTRA[:count])
            cfg_plus = config.from_dict(data, "bench")
            rebuild = {"base"} if way == "A" else None
            (built,), seconds = timed(
                f"{way} +{EXTRA[count - 1]}", lambda c=cfg_plus, r=rebuild: api.build(c, ["bench"], rebuild=r)
            )
            manifest = json.loads((built.image.parent / "base.json").read_text())
            assert ("from" in manifest) == (way == "B"), f"{way}: {manifest['timings_seconds']}"
            plus[way].append(seconds)
            print(f"    its steps: {manifest['timings_seconds']}", flush=True)

    print(f"{'build':52} {'seconds':>8}")
    print(f"{'plain mmdebstrap, directory only (mean of 2)':52} {plain_seconds:8.1f}")
    print(f"{'stage4 base, GPT disk + zstd qcow2 (mean of 2)':52} {stage4_seconds:8.1f}")
    old, new = sum(plus["A"]) / 2, sum(plus["B"]) / 2
    print(f"{'one more package, old way (bootstrap; mean of 2)':52} {old:8.1f}")
    print(f"{'one more package, kept tree updated (mean of 2)':52} {new:8.1f}")
    print(f"ratio new/old: {new / old:.2f}; new way {new:.1f} s (target <= 20 s)")
    print(f"load average (1, 5, 15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"ratio stage4/mmdebstrap: {stage4_seconds / plain_seconds:.2f} (target <= 0.35, issue 19)")
    print(f"image size: {image_mib:.0f} MiB (qcow2, zstd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
