"""Benchmark of the layer pipeline (not a test): one run, printed figures.

1. a full layered build (base reused if present in the output folder),
2. a rebuild with no change (target: < 5 s),
3. a rebuild after a prod-only change (target: <= 1.1 x the prod step alone),
4. the same small playbook on a fresh overlay: chroot way vs VM way,
5. the layered build with the real dnbd3 and xloop (default components and the shipped dnbd3-rootfs
   module) on the reused base (target: <= 90 s), if their sources are in stage4's source cache.

Usage: .venv/bin/python bench/layers.py [WORK_DIR]   (default: /tmp/stage4-bench-layers)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import timed

from stage4 import api, config
from stage4.context import Context
from stage4.image import overlay
from stage4.layers.layer_steps import base_root_partition, choose_accelerator
from stage4.provisioning import ansible, attach, vm
from stage4.runner import Runner
from stage4.ui import Display

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NAME = "debian-12"
SMALL_PLAYBOOK = """\
- hosts: all
  gather_facts: true
  tasks:
    - name: Write a file
      ansible.builtin.copy: {content: "bench\\n", dest: /etc/stage4-bench, mode: "0644"}
    - name: Ask dpkg
      ansible.builtin.command: dpkg-query -W openssh-server
      changed_when: false
"""


def make(root: Path, prod_text: str) -> config.Config:
    images = {
        NAME: {
            "distribution": "debian-12",
            "dev": {"playbooks": [str(root / "playbooks/dev.yml")]},
            "prod": {
                "playbooks": [str(root / "playbooks/prod.yml")],
                "vars": {"stage4_fixture_text": prod_text},
            },
            "initramfs": {"dracut_modules": ["stage4test"], "source": {"path": str(root / "dracut")}},
            "components": {
                "fixture": {
                    "source": {"path": str(root / "component")},
                    "build": ['make -C "$KDIR" M="$PWD" modules', "gcc -O2 -o stage4-hello hello.c"],
                    "artifacts": [
                        {"path": "stage4hello.ko", "kind": "module"},
                        {"path": "stage4-hello", "dest": "/usr/local/bin/stage4-hello", "mode": "0755"},
                    ],
                }
            },
        }
    }
    data = {
        "build": {"output_dir": str(root / "output"), "cache_dir": str(Path("~/.cache/stage4").expanduser())},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": images,
    }
    return config.from_dict(data, str(root / "stage4.toml"))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage4-bench-layers")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("playbooks", "dracut", "component"):
        if not (root / name).exists():
            shutil.copytree(FIXTURES / name, root / name)
    print("stage4 layer benchmark", flush=True)
    (full,), t_full = timed(
        "full layered build", lambda: api.build(make(root, "bench v1"), [NAME], rebuild={"dev"})
    )
    (_,), t_none = timed("rebuild, no change", lambda: api.build(make(root, "bench v1"), [NAME]))
    (changed,), t_prod = timed(
        "rebuild after a prod-only change", lambda: api.build(make(root, "bench v2"), [NAME])
    )
    prod_step = sum(changed.manifest["timings_seconds"].values())
    print(f"  prod step alone (provision + flatten, from prod.json): {prod_step:.1f} s")
    print(
        f"  ratios: no-change rebuild {t_none:.1f} s (target < 5 s); "
        f"prod-only rebuild / prod step = {t_prod / prod_step:.2f} (target <= 1.1); "
        f"full / no-change = {t_full / max(t_none, 0.01):.0f}x"
    )

    # chroot vs VM for the same small playbook, each on a fresh overlay of the base.
    cfg = make(root, "bench v2")
    runner = Runner(Display())
    ctx = Context(
        NAME, cfg.images[NAME], cfg.machine, cfg.source, cfg.build.output_dir, cfg.build.cache_dir, runner
    )
    base_manifest, part = full.base.manifest, base_root_partition(ctx, full.base.manifest)
    with tempfile.TemporaryDirectory(prefix="stage4-bench-", dir=cfg.build.cache_dir / "work") as tmp:
        work = Path(tmp)
        playbook = work / "small.yml"
        playbook.write_text(SMALL_PLAYBOOK)
        plays = ansible.site([], [playbook], [])

        def chroot_way() -> None:
            layer = work / "chroot.qcow2"
            overlay.create(full.base.image, layer, runner, "bench: overlay")
            with (
                attach.attached(layer, part, work / "a1", runner, writable=True) as mounted,
                attach.chroot_ready(mounted, runner),
            ):
                ansible.run(
                    ansible.Target("chroot", root=mounted), plays, {}, work / "ans1", runner, "bench chroot"
                )

        def vm_way() -> None:
            layer = work / "vm.qcow2"
            overlay.create(full.base.image, layer, runner, "bench: overlay")
            accelerator = choose_accelerator(ctx, base_manifest, work)
            with vm.running(
                layer, part, accelerator, cfg.machine.cpus, cfg.machine.memory >> 20, work, runner, "bench vm"
            ) as target:
                ansible.run(target, plays, {}, work / "ans2", runner, "bench vm")

        _, t_chroot = timed("small playbook, chroot way (attach + run + detach)", chroot_way)
        _, t_vm = timed("small playbook, VM way (boot + SSH + run + poweroff)", vm_way)
        print(f"  VM / chroot = {t_vm / t_chroot:.1f}x")

    real_components(root)


def real_components(root: Path) -> None:
    """The default image layout of a netboot site: dnbd3, xloop and the shipped stage-3 module."""
    from stage4.provisioning.source_cache import SourceCache

    cache = SourceCache(Path("~/.cache/stage4").expanduser())
    missing = [
        name
        for name, c in config.default_components().items()
        if c.source.git and not cache.git_entry(c.source.git, c.source.ref)
    ]
    if missing:
        print(
            f"  real dnbd3/xloop: skipped, not in the source cache: {', '.join(missing)} "
            "(stage4 sources import URL DIR)"
        )
        return
    cfg = make(root, "bench v2")
    data = cfg.model_dump(mode="json")
    data["images"][NAME] = {"distribution": "debian-12", "dev": {}, "prod": {}}  # defaults: dnbd3, xloop
    real = config.from_dict(data, str(root / "stage4.toml"))
    (built,), seconds = timed(
        "layered build with the real dnbd3 and xloop, base reused",
        lambda: api.build(real, [NAME], rebuild={"dev"}),
    )
    dev_t, prod_t = built.dev_manifest["timings_seconds"], built.manifest["timings_seconds"]
    print(f"  of it: dev {sum(dev_t.values()):.1f} s {dev_t}, prod {sum(prod_t.values()):.1f} s {prod_t}")
    print(f"  target <= 90 s: {'met' if seconds <= 90 else 'not met'} ({seconds:.1f} s)")


if __name__ == "__main__":
    from stage4.runner import install_signal_handlers

    install_signal_handlers()
    main()
