"""Benchmark (not a test): the same prod playbook run by Packer over a backing file vs by stage4's own VM
runner, in one run. Each way gets a fresh overlay on the same bootstrap base (built, or reused from
the output folder); prints both times, the ratio and the overlay sizes before flattening.

Usage: .venv/bin/python bench/packer_layer.py [WORK_DIR]   (default: /tmp/stage4-bench-packer)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import timed

from stage4 import api, config
from stage4.image import overlay
from stage4.image.filesystem import extract_boot_files
from stage4.machine import accel
from stage4.provisioning import ansible, attach, packer_way, vm
from stage4.runner import Runner, install_signal_handlers
from stage4.ui import Display

PROD_PLAYBOOK = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "playbooks" / "prod.yml"
NAME = "debian-12"
MIB = 1 << 20


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage4-bench-packer")
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "build": {"output_dir": str(root / "output"), "cache_dir": str(Path("~/.cache/stage4").expanduser())},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": {NAME: {"distribution": NAME}},
    }
    cfg = config.from_dict(data, str(root / "stage4.toml"))
    print(
        "stage4 benchmark: prod playbook by Packer (disk_image over a backing file) vs the VM way", flush=True
    )
    (base,), _ = timed("base (built or reused)", lambda: api.build(cfg, [NAME]))
    manifest = json.loads((base.image.parent / "base.json").read_text())
    image = cfg.images[NAME]
    part = attach.RootPartition.from_manifest(manifest, image.identifier, image.filesystem.value)
    runner = Runner(Display())
    plays = ansible.site([], [PROD_PLAYBOOK], [])
    variables = {"stage4_fixture_text": "bench"}
    memory_mib = cfg.machine.memory >> 20
    (cfg.build.cache_dir / "work").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stage4-bench-packer-", dir=cfg.build.cache_dir / "work") as tmp:
        work = Path(tmp)
        kernel, _ = extract_boot_files(base.image, work / "probe", runner, image.identifier)
        accelerator = accel.choose(cfg.machine.accelerator.value, kernel, runner, cfg.build.cache_dir)
        print(f"  accelerator: {accelerator}; cpus {cfg.machine.cpus}, memory {memory_mib} MiB", flush=True)

        def packer_run() -> dict:
            layer = work / "packer-way" / "layer.qcow2"
            layer.parent.mkdir()
            overlay.create(base.image, layer, runner, "bench: overlay")
            facts = packer_way.provision(
                layer,
                part,
                accelerator,
                cfg.machine,
                plays,
                variables,
                layer.parent,
                runner,
                "bench: packer",
                "bench: prod",
            )
            return {**facts, "layer": layer.stat().st_size}

        def vm_run() -> dict:
            layer = work / "vm-way" / "layer.qcow2"
            layer.parent.mkdir()
            overlay.create(base.image, layer, runner, "bench: overlay")
            with vm.running(
                layer, part, accelerator, cfg.machine.cpus, memory_mib, layer.parent, runner, "bench: vm"
            ) as target:
                ansible.run(target, plays, variables, layer.parent / "ansible", runner, "bench: vm")
            return {"layer": layer.stat().st_size}

        packer_facts, t_packer = timed(
            "Packer way (build user, packer build: boot + SSH + playbook + poweroff, commit, remove user)",
            packer_run,
        )
        vm_facts, t_vm = timed(
            "VM way (build user, qemu: boot + SSH + playbook + poweroff, remove user)", vm_run
        )
        print(f"  Packer {packer_facts['packer_version']} / VM way = {t_packer / t_vm:.2f}x")
        print(
            f"  overlay sizes before flattening: Packer way {packer_facts['layer'] / MIB:.1f} MiB "
            f"(Packer's own overlay before the commit: {packer_facts['packer_overlay_size'] / MIB:.1f} MiB), "
            f"VM way {vm_facts['layer'] / MIB:.1f} MiB"
        )


if __name__ == "__main__":
    install_signal_handlers()
    main()
