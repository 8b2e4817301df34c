"""Where the guest kernel spends stage 4 of a netboot, against a local boot of the same image (not a test).

Run once: `.venv/bin/python bench/netboot_profile.py -c stage4.toml IMAGE`.

One layered image (built or reused by `stage4 build`), exported into a temporary store. A copy of the
revision's initramfs gets one more archive: a dracut pre-pivot hook that, at the switch to stage 4, resets
the kernel's tick profile (`profile=2`: /proc/profile counts the kernel function each timer tick lands in)
and notes the page allocations so far, and leaves a runtime unit that prints, just before the marker,
stage 4's profile (`readprofile` with /proc/kallsyms, in the image) and the allocations since. Booted with
that initramfs and `--kernel-arg profile=2`, --rounds times each, alternating: as a client with the RAM
layer (`stage4 netboot --boot-dir`) and from the local prod file (`stage4 boot --kernel --initrd`).

Prints for every boot the seconds of stage 4 (guest clock: switch to stage 4 to the end of the boot), the
ticks the kernel was busy (not in its idle loop), the pages it allocated, and its busiest functions; then
the medians side by side with their ratios netboot/local. Under TCG every tick is emulated work; what the
netboot adds there is what a real client, at native speed, does not wait for (docs/qcow2-for-xloop.md).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from timing import stage4, timed

NAME = "stage4/bench-profile.qcow2"
TOP = 12
# Sourced by dracut's pre-pivot service (no exit). Only the tools the stage-3 module installs (grep, tr, cut).
HOOK = r"""#!/bin/sh
# bench/netboot_profile.py: stage 4's kernel tick profile, printed just before the marker
if [ -w /proc/profile ]; then
    echo 0 > /proc/profile
    pages=$(grep '^pgalloc_' /proc/vmstat | tr '\n' ' ')
    echo "<2>STAGE4-PROFILE switch uptime=$(cut -d' ' -f1 /proc/uptime) $pages" > /dev/kmsg
    mkdir -p /run/systemd/system/multi-user.target.wants
    printf '%s\n' '[Unit]' 'Description=bench: kernel tick profile of stage 4' 'After=multi-user.target' \
        'Before=stage4-marker.service' '[Service]' 'Type=oneshot' 'ExecStart=/bin/sh /run/stage4-profile.sh' \
        > /run/systemd/system/stage4-profile.service
    ln -sf ../stage4-profile.service /run/systemd/system/multi-user.target.wants/stage4-profile.service
    cat > /run/stage4-profile.sh << 'EOF'
pages=$(grep '^pgalloc_' /proc/vmstat | tr '\n' ' ')
echo "<2>STAGE4-PROFILE end uptime=$(cut -d' ' -f1 /proc/uptime) $pages" > /dev/kmsg
readprofile -m /proc/kallsyms | sort -k1,1nr | head -n 40 | while read -r ticks name _; do
    echo "<2>STAGE4-PROFILE tick $ticks $name" > /dev/kmsg
done
EOF
else
    echo "<2>STAGE4-PROFILE none: no /proc/profile (boot with profile=2)" > /dev/kmsg
fi
"""
MARK = re.compile(r"STAGE4-PROFILE (switch|end) uptime=([\d.]+) (.*)")
TICK = re.compile(r"STAGE4-PROFILE tick (\d+) (\S+)")
IDLE = re.compile(r"idle|halt")


def add_hook(initrd: Path, work: Path) -> None:
    """Append the hook as one more zstd cpio archive: the kernel unpacks them in order."""
    hook = work / "usr/lib/dracut/hooks/pre-pivot/98-bench-profile.sh"
    hook.parent.mkdir(parents=True)
    hook.write_text(HOOK)
    hook.chmod(0o755)
    names = "\n".join(str(p.relative_to(work)) for p in sorted(work.rglob("*"))) + "\n"
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=names.encode(),
        cwd=work,
        capture_output=True,
        check=True,
    ).stdout
    with initrd.open("ab") as out:
        out.write(subprocess.run(["zstd", "-q", "-c"], input=archive, capture_output=True, check=True).stdout)


def profile(log: Path) -> dict:
    """Stage 4 of one boot: seconds, pages allocated, busy ticks and {function: ticks}."""
    text = log.read_text(errors="replace")
    marks = {kind: (float(up), rest) for kind, up, rest in MARK.findall(text)}
    if set(marks) != {"switch", "end"}:
        sys.exit(f"{log}: no STAGE4-PROFILE lines (is readprofile in the image? was profile=2 given?)")

    def pages(rest: str) -> int:
        return sum(int(n) for n in re.findall(r"pgalloc_\w+ (\d+)", rest))

    ticks = {name: int(n) for n, name in TICK.findall(text)}
    busy = ticks.pop("total", 0) - sum(n for name, n in ticks.items() if IDLE.search(name))
    return {
        "seconds": marks["end"][0] - marks["switch"][0],
        "pages": pages(marks["end"][1]) - pages(marks["switch"][1]),
        "busy": busy,
        "ticks": {name: n for name, n in ticks.items() if not IDLE.search(name)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", type=Path, default=Path("stage4.toml"), help="project file")
    parser.add_argument("image", help="a layered image of the project file")
    parser.add_argument("--rounds", type=int, default=2, help="boots of each kind")
    args = parser.parse_args()
    output = stage4(args.config, "build", args.image)
    prod = Path(output.split(": ", 1)[1].split(" (")[0])
    with tempfile.TemporaryDirectory(prefix="stage4-bench-profile-") as tmp:
        work = Path(tmp)
        store, boot = work / "store", work / "boot"
        store.mkdir()
        stage4(args.config, "export", prod, "--store", store, "--name", NAME, "--server", "192.0.2.10")
        shutil.copytree(store / ".stage4" / NAME, boot)
        add_hook(boot / "initrd.r1", work / "hook")
        kinds = {
            "netboot": lambda log: stage4(
                args.config,
                "netboot",
                store,
                NAME,
                "--boot-dir",
                boot,
                "--kernel-arg",
                "profile=2",
                "--log",
                log,
            ),
            "local": lambda log: stage4(
                args.config,
                "boot",
                prod,
                "--kernel",
                boot / "kernel.r1",
                "--initrd",
                boot / "initrd.r1",
                "--kernel-arg",
                "profile=2",
                "--log",
                log,
            ),
        }
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for round_ in range(args.rounds):
            for kind in list(kinds) if round_ % 2 == 0 else reversed(kinds):
                log = work / f"{kind}-{round_}.log"
                timed(
                    f"round {round_ + 1}: {kind} (whole command)", lambda run=kinds[kind], log=log: run(log)
                )
                found = profile(log)
                runs[kind].append(found)
                top = ", ".join(
                    f"{name} {n}" for name, n in sorted(found["ticks"].items(), key=lambda x: -x[1])[:4]
                )
                print(
                    f"    stage 4: {found['seconds']:.1f} s, {found['busy']} busy ticks, "
                    f"{found['pages']} pages allocated; {top}",
                    flush=True,
                )
    median = {
        kind: {key: statistics.median(r[key] for r in found) for key in ("seconds", "busy", "pages")}
        for kind, found in runs.items()
    }
    print(f"stage 4, medians of {args.rounds}: netboot / local")
    for key, unit in (("seconds", "s"), ("busy", "busy kernel ticks"), ("pages", "pages allocated")):
        net, local = median["netboot"][key], median["local"][key]
        print(f"  {unit}: {net:.0f} / {local:.0f} = {net / local:.2f}")
    names = {name for found in runs["netboot"] for name in found["ticks"]}
    table = []
    for name in names:
        net = statistics.median(r["ticks"].get(name, 0) for r in runs["netboot"])
        local = statistics.median(r["ticks"].get(name, 0) for r in runs["local"])
        table.append((net - local, name, net, local))
    print("the kernel functions the netboot adds most ticks to (median ticks: netboot / local):")
    for extra, name, net, local in sorted(table, reverse=True)[:TOP]:
        print(f"  {name}: {net:.0f} / {local:.0f} (+{extra:.0f})")


if __name__ == "__main__":
    main()
