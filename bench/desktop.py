"""Benchmark of the desktop prod layer (not a test): one run, printed figures.

1. the Xfce image (test fixture component and dracut module, [images.xfce.desktop] session = "xfce"),
   built once to have the base and a warm package cache (reused when WORK_DIR holds it),
2. its prod layer rebuilt on the reused base with the warm cache (stage4: attach, Ansible with the
   kernel hold, packages and the stage4_desktop role, cleanup, flatten),
3. the same packages installed by plain `apt-get install --no-install-recommends` in a chroot of a raw
   copy of the same base, with the same warm cache; 2 and 3 in A-B-B-A order, ratio of the means
   (target <= 1.2),
4. the sizes of base.qcow2 and of the flattened desktop image prod.qcow2.

Usage: .venv/bin/python bench/desktop.py [WORK_DIR]   (default: /tmp/stage4-bench-desktop)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import timed

from stage4 import api, config
from stage4.provisioning.ansible import ROLES_DIR

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NAME = "xfce"
CACHE = Path("~/.cache/stage4").expanduser()


def make(root: Path) -> config.Config:
    image = {
        "distribution": "debian-12",
        "dev": {},
        "prod": {},
        "desktop": {"session": "xfce"},
        "initramfs": {"dracut_modules": ["stage4test"], "source": {"path": str(root / "dracut")}},
        "components": {
            "fixture": {
                "source": {"path": str(root / "component")},
                "build": ['make -C "$KDIR" M="$PWD" modules'],
                "artifacts": [{"path": "stage4hello.ko", "kind": "module"}],
            }
        },
    }
    data = {
        "build": {"output_dir": str(root / "output"), "cache_dir": str(CACHE)},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": {NAME: image},
    }
    return config.from_dict(data, str(root / "stage4.toml"))


def xfce_packages() -> list[str]:
    defaults = yaml.safe_load((ROLES_DIR / "stage4_desktop/defaults/main.yml").read_text())
    return defaults["stage4_desktop_sessions"]["xfce"]["packages"]


def root_offset(raw: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True).stdout)
    (root,) = [p for p in table["partitiontable"]["partitions"] if p.get("name") == "SLX_SYS"]
    return root["start"] * table["partitiontable"].get("sectorsize", 512)


def plain_apt(base: Path, work: Path, packages: list[str]) -> float:
    """apt-get in a chroot of a raw copy of the base, the package cache bound in; returns its seconds."""
    raw, mnt = work / "base.raw", work / "mnt"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base), str(raw)], check=True)
    mnt.mkdir(exist_ok=True)
    archives = CACHE / "apt" / "debian-12"
    with contextlib.ExitStack() as stack:
        subprocess.run(["mount", "-o", f"loop,offset={root_offset(raw)}", str(raw), str(mnt)], check=True)
        stack.callback(subprocess.run, ["umount", "--recursive", "--lazy", str(mnt)], check=False)
        for source, target in (
            ("/proc", "proc"),
            ("/sys", "sys"),
            ("/dev", "dev"),
            ("/dev/pts", "dev/pts"),
            (archives, "mnt"),
        ):
            subprocess.run(["mount", "--bind", str(source), str(mnt / target)], check=True)
        resolv = mnt / "etc/resolv.conf"
        resolv.unlink(missing_ok=True)
        shutil.copy("/etc/resolv.conf", resolv)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        apt = ["chroot", str(mnt), "apt-get", "-o", "Dir::Cache::Archives=/mnt/"]
        start = time.monotonic()
        subprocess.run([*apt, "update", "-qq"], check=True, env=env)
        subprocess.run(
            [*apt, "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.monotonic() - start
    raw.unlink()
    return seconds


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage4-bench-desktop")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dracut", "component"):
        if not (root / name).exists():
            shutil.copytree(FIXTURES / name, root / name)
    print("stage4 desktop benchmark (Xfce, Debian 12)", flush=True)
    timed("first build (base and package cache, reused when present)", lambda: api.build(make(root), [NAME]))
    work = root / "plain"
    work.mkdir(exist_ok=True)
    # A-B-B-A: stage4, plain, plain, stage4, so that a drift of the machine's speed hits both alike.
    provisions, layers, plains = [], [], []
    for label in ("stage4", "plain", "plain", "stage4"):
        if label == "stage4":
            (built,), t_layer = timed(
                "prod layer rebuilt on the reused base, warm package cache",
                lambda: api.build(make(root), [NAME], rebuild={"prod"}),
            )
            provisions.append(built.manifest["timings_seconds"]["provision"])
            layers.append(t_layer)
            print(f"  of it: {built.manifest['timings_seconds']}")
        else:
            plains.append(plain_apt(built.base.image, work, xfce_packages()))
            print(f"  plain apt-get update + install --no-install-recommends in a chroot: {plains[-1]:.1f} s")
    provision, t_layer, t_plain = sum(provisions) / 2, sum(layers) / 2, sum(plains) / 2
    print(f"  means: stage4 provision {provision:.1f} s, prod rebuild {t_layer:.1f} s, plain {t_plain:.1f} s")
    print(
        f"  ratios: stage4 provision / plain apt-get = {provision / t_plain:.2f} (target <= 1.2); "
        f"whole prod rebuild (with flatten) / plain apt-get = {t_layer / t_plain:.2f}"
    )
    base_size, prod_size = built.base.image.stat().st_size, built.image.stat().st_size
    print(
        f"  sizes: base.qcow2 {base_size / 2**20:.0f} MiB, flattened desktop prod.qcow2 "
        f"{prod_size / 2**20:.0f} MiB (the desktop layer adds {(prod_size - base_size) / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    from stage4.runner import install_signal_handlers

    install_signal_handlers()
    main()
