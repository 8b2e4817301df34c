"""qemu's command line where every stage4 guest shares it: the accelerator's CPU model, a headless VM
whose serial console is stdio, that exits instead of rebooting. Boots (boot/qemu.py), the VM way of
provisioning (provisioning/vm.py) and the KVM probe (machine/accel.py) add their own devices to it; the
Packer templates (builders/packer.py) take the same CPU model.
"""

from __future__ import annotations

# qemu's default CPU lacks x86-64-v2, which EL 9 needs; "max" is everything TCG can emulate, less the two
# "fast string" flags: with them the guest kernel zeroes every page and copies with `rep stosb`/`rep movsb`,
# which TCG emulates one element at a time (local boots to the marker, medians: 55 s with both, 36 s without
# erms, 32.5 s without both; with them a module load once stalled a CPU for 21 s in clear_page_erms).
# KVM guests get the host's CPU as it is.
TCG_CPU = "max,erms=off,fsrm=off"
# The Packer templates' description of their cpu_model variable.
CPU_MODEL_HELP = "qemu -cpu: host under KVM, max without the fast-string flags under TCG"


def cpu_model(accelerator: str) -> str:
    return "host" if accelerator == "kvm" else TCG_CPU


def headless_argv(accelerator: str, cpus: int, memory_mib: int) -> list[str]:
    """qemu-system-x86_64 with the accelerator, CPUs and memory: no display, no monitor, the serial
    console on stdio, no reboot (a guest that reboots ends qemu)."""
    return [
        "qemu-system-x86_64",
        "-accel",
        accelerator,
        "-cpu",
        cpu_model(accelerator),
        "-smp",
        str(cpus),
        "-m",
        str(memory_mib),
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
