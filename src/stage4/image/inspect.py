"""`stage4 inspect`: what an image holds and whether a Stage4 client can boot it.

Facts come from the qcow2 header, sfdisk, blkid and the root filesystem's /boot (read without
mounting where the filesystem allows, see filesystem.py). The checks are the client side's conditions:
the root partition found by the identifier as both GPT name and filesystem label, a standalone qcow2
that xloop accepts, and for each kernel in /boot a module tree, extra modules (modinfo's vermagic) and
an initramfs (lsinitrd) that belong to it: modules built for another kernel do not load.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stage4.config import DEFAULT_IDENTIFIER
from stage4.image import filesystem, qcow2
from stage4.image.initrd import initramfs_facts
from stage4.image.partitions import PartitionInfo, raw_view, root_partition
from stage4.image.partitions import partitions as read_partitions
from stage4.runner import Runner

GROWABLE_FILESYSTEMS = ("ext4", "xfs")  # what stage 4's systemd-grow_rootfs can resize


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""
    required: bool = True


@dataclass
class KernelFacts:
    """Whether the module tree, the extra modules and the initramfs in the image belong to one kernel."""

    version: str
    initramfs: str  # file name in /boot, '' if none
    modules_tree: bool  # /lib/modules/VERSION/kernel is there
    extra_modules: dict[str, str] = field(default_factory=dict)  # module file -> kernel of its vermagic
    initramfs_kernels: list[str] | None = None  # kernels of the modules in the initramfs; None: not read

    def problems(self) -> list[str]:
        found = []
        if not self.modules_tree:
            found.append(f"no /lib/modules/{self.version}/kernel")
        found += [
            f"extra/{name} is built for {built or 'no kernel'}"
            for name, built in sorted(self.extra_modules.items())
            if built != self.version
        ]
        if not self.initramfs:
            found.append("no initramfs")
        elif self.initramfs_kernels is not None and self.initramfs_kernels != [self.version]:
            found.append(
                f"its initramfs holds modules for {', '.join(self.initramfs_kernels) or 'no kernel'}"
            )
        return found

    def describe(self) -> str:
        initramfs = self.initramfs or "MISSING"
        if self.initramfs and self.initramfs_kernels is not None:
            initramfs += f" (modules for {', '.join(self.initramfs_kernels) or 'no kernel'})"
        extra = ", ".join(f"{name} ({built or '?'})" for name, built in sorted(self.extra_modules.items()))
        return (
            f"kernel {self.version}: modules tree {'yes' if self.modules_tree else 'MISSING'}, "
            f"extra modules {extra or 'none'}, initramfs {initramfs}"
        )


@dataclass
class InspectReport:
    image: Path
    format: str
    size: int
    identifier: str
    qcow2: qcow2.Qcow2Header | None
    partition_table: str | None
    partitions: list[PartitionInfo] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    kernel_facts: list[KernelFacts] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks if check.required)

    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.required and not c.passed]

    def to_dict(self) -> dict[str, object]:
        return {
            "image": str(self.image),
            "format": self.format,
            "file_size": self.size,
            "identifier": self.identifier,
            "qcow2": self.qcow2.to_dict() if self.qcow2 else None,
            "partition_table": self.partition_table,
            "partitions": [asdict(p) for p in self.partitions],
            "kernels": [
                {
                    "version": k.version,
                    "initramfs": k.initramfs or None,
                    "modules_tree": k.modules_tree,
                    "extra_modules": k.extra_modules,
                    "initramfs_kernels": k.initramfs_kernels,
                    "belongs": not k.problems(),
                }
                for k in self.kernel_facts
            ],
            "checks": [asdict(c) for c in self.checks],
            "passed": self.passed,
        }

    def print(self, console: Console) -> None:
        console.print(f"[bold]{self.image}[/bold]: {self.format}, {self.size / (1 << 20):.1f} MiB on disk")
        if self.qcow2:
            q = self.qcow2
            console.print(
                f"  qcow2 v{q.version}, virtual {q.virtual_size / (1 << 30):.2f} GiB, "
                f"cluster {q.cluster_size}, "
                f"compression {q.compression}, backing file {q.backing_file or 'none'}, "
                f"dirty {q.dirty}, corrupt {q.corrupt}"
            )
        parts = Table(
            "#",
            "GPT name",
            "type",
            "size",
            "filesystem",
            "label",
            title=f"partition table: {self.partition_table}",
        )
        for p in self.partitions:
            parts.add_row(
                str(p.number),
                p.name,
                p.type_guid,
                f"{p.size / (1 << 20):.0f} MiB",
                p.fs_type or "",
                p.fs_label or "",
            )
        console.print(parts)
        for facts in self.kernel_facts:
            console.print(f"  {facts.describe()}", markup=False, soft_wrap=True)
        for check in self.checks:
            mark = (
                "[green]PASS[/green]"
                if check.passed
                else ("[red]FAIL[/red]" if check.required else "[yellow]WARN[/yellow]")
            )
            console.print(f"  {mark} {check.name}" + (f" — {check.detail}" if check.detail else ""))
        console.print(
            "[green]Stage4 requirements met[/green]"
            if self.passed
            else "[red]Stage4 requirements NOT met[/red]"
        )


def detect_identifier(parts: list[PartitionInfo]) -> str | None:
    """The identifier an image was built with: a partition whose GPT name equals its filesystem label."""
    candidates = [p for p in parts if p.name and p.name == p.fs_label and p.fs_type not in (None, "vfat")]
    return candidates[0].name if candidates else None


def _qcow2_checks(header: qcow2.Qcow2Header | None) -> list[Check]:
    if header is None:
        return [Check("format is qcow2", False, "a raw image; export a qcow2 (xloop reads qcow2)")]
    return [Check(name, met, detail) for name, met, detail in header.client_checks()]


def inspect_image(image: Path, identifier: str | None = None, runner: Runner | None = None) -> InspectReport:
    runner = runner or Runner()
    header = qcow2.read_header(image) if qcow2.is_qcow2(image) else None
    with raw_view(image, runner) as raw:
        table, parts = read_partitions(raw, runner)
        wanted = identifier or detect_identifier(parts) or DEFAULT_IDENTIFIER
        report = InspectReport(
            image, "qcow2" if header else "raw", image.stat().st_size, wanted, header, table, parts
        )
        report.checks += _qcow2_checks(header)
        report.checks.append(Check("GPT partition table", table == "gpt", table or "none"))
        root = root_partition(parts, wanted)
        report.checks.append(
            Check(
                f"a partition with GPT name {wanted!r}",
                root is not None,
                "" if root else f"names: {', '.join(p.name for p in parts) or 'none'}",
            )
        )
        if root is None:
            return report
        report.checks.append(
            Check(
                f"its filesystem label is {wanted!r}",
                root.fs_label == wanted,
                f"label {root.fs_label!r}, {root.fs_type}",
            )
        )
        report.checks.append(
            Check(
                "root filesystem can be grown by stage 4 (ext4, xfs)",
                root.fs_type in GROWABLE_FILESYSTEMS,
                root.fs_type or "unknown",
                required=False,
            )
        )
        if root.fs_type in ("ext4", "xfs", "btrfs"):
            with filesystem.FilesystemReader(raw, root, runner) as reader:
                report.kernels = filesystem.boot_files(reader)
                report.kernel_facts = [
                    kernel_facts(reader, version, initrd, runner)
                    for version, initrd in sorted(report.kernels.items())
                ]
        report.checks.append(
            Check(
                "a kernel and its initramfs in /boot",
                any(report.kernels.values()),
                ", ".join(sorted(report.kernels)) or "none found",
            )
        )
        for facts in report.kernel_facts:
            problems = facts.problems()
            report.checks.append(
                Check(
                    f"kernel {facts.version}: its modules and initramfs belong to it",
                    not problems,
                    "; ".join(problems),
                )
            )
    return report


def kernel_facts(
    reader: filesystem.FilesystemReader, version: str, initramfs: str, runner: Runner
) -> KernelFacts:
    """What in the image belongs to kernel `version`: read with modinfo and lsinitrd from copies."""
    tree = f"/lib/modules/{version}"
    facts = KernelFacts(version, initramfs, "kernel" in reader.list_dir(tree))
    with tempfile.TemporaryDirectory(prefix="stage4-kernel-") as tmp:
        for name in reader.list_dir(f"{tree}/extra"):
            if ".ko" not in name:
                continue
            copy = Path(tmp) / name
            reader.copy_out(f"{tree}/extra/{name}", copy)
            result = runner.run(
                ["modinfo", "-F", "vermagic", copy], step="read module", capture=True, check=False
            )
            facts.extra_modules[name] = (result.stdout.split() or [""])[0] if result.returncode == 0 else ""
        if initramfs and shutil.which("lsinitrd"):
            copy = Path(tmp) / initramfs
            reader.copy_out(f"/boot/{initramfs}", copy)
            facts.initramfs_kernels = initramfs_facts(copy, runner, "read initramfs")["kernel_versions"]
    return facts
