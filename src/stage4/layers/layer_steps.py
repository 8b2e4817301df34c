"""What the dev and prod steps share: the work folder, the base's root partition and kernel, the playbook
check, and running Ansible on an overlay the configured way (chroot, VM or Packer)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stage4.config import LayerConfig, Way
from stage4.errors import StepFailed
from stage4.fsutil import remove_tree
from stage4.image.filesystem import extract_boot_files
from stage4.machine import accel
from stage4.provisioning import ansible, attach, packer_way, vm

if TYPE_CHECKING:
    from stage4.context import Context


def work_dir(ctx: Context) -> Path:
    """The layers' work folder of this image: one per output folder, so builds into others do not collide."""
    where = hashlib.sha256(str(ctx.output_dir.absolute()).encode()).hexdigest()[:12]
    return ctx.cache_dir / "work" / f"{ctx.name}-layers-{where}"


def fresh_work_dir(ctx: Context, layer_name: str) -> Path:
    """The layer's work folder, emptied of anything an earlier, interrupted run left."""
    work = work_dir(ctx) / layer_name
    remove_tree(work)
    work.mkdir(parents=True)
    return work


def base_root_partition(ctx: Context, base_manifest: dict[str, Any]) -> attach.RootPartition:
    return attach.RootPartition.from_manifest(base_manifest, ctx.image.identifier, ctx.image.filesystem.value)


def kernel_of(base_manifest: dict[str, Any]) -> str:
    """The kernel the layers build for: the newest one the base installed (recorded in its manifest)."""
    kernel: str = base_manifest["kernel_versions"][-1]
    return kernel


def check_playbooks(ctx: Context, layer_name: str, layer: LayerConfig) -> None:
    for playbook in layer.playbooks:
        if not playbook.is_file():
            raise StepFailed(
                f"{ctx.name}: {layer_name}: provision",
                f"playbook {playbook} does not exist (images.{ctx.name}.{layer_name}.playbooks)",
                ctx.runner.log_path,
            )


def provision_layer(
    ctx: Context,
    base_manifest: dict[str, Any],
    layer_name: str,
    layer: LayerConfig,
    overlay_path: Path,
    plays: list[dict[str, Any]],
    variables: dict[str, Any],
    work: Path,
) -> None:
    """Run the plays on the layer the configured way."""
    runner = ctx.runner
    part = base_root_partition(ctx, base_manifest)
    way = layer.way
    if way is Way.chroot and (reason := attach.chroot_unavailable()):
        runner.display.info(
            f"{ctx.name}: {layer_name}: the chroot way cannot serve here ({reason}); using the VM way"
        )
        way = Way.vm
    step = f"{ctx.name}: {layer_name}: provision ({way.value})"
    with runner.display.step(step):
        if way is Way.chroot:
            apt_cache = ctx.cache_dir / "apt" / ctx.image.distribution
            with (
                attach.attached(
                    overlay_path, part, work / "attach", runner, writable=True, step=step
                ) as root,
                attach.chroot_ready(root, runner, apt_cache, step=step),
            ):
                try:
                    ansible.run(
                        ansible.Target("chroot", root=root), plays, variables, work / "ansible", runner, step
                    )
                finally:
                    for leftover in (root / ansible.REMOTE_TMP.lstrip("/"), root / "root/.ansible"):
                        remove_tree(leftover)
        elif way is Way.packer:
            packer_way.provision(
                overlay_path,
                part,
                choose_accelerator(ctx, base_manifest, work),
                ctx.machine,
                plays,
                variables,
                work,
                runner,
                step,
                f"{ctx.name}: {layer_name}",
            )
        else:
            accelerator = choose_accelerator(ctx, base_manifest, work)
            with vm.running(
                overlay_path,
                part,
                accelerator,
                ctx.machine.cpus,
                ctx.machine.memory >> 20,
                work,
                runner,
                step,
            ) as target:
                ansible.run(target, plays, variables, work / "ansible", runner, step)


def choose_accelerator(ctx: Context, base_manifest: dict[str, Any], work: Path) -> str:
    requested = ctx.machine.accelerator.value
    if requested != "auto":
        return requested
    base = ctx.image_dir / base_manifest["image"]["file"]
    kernel, _ = extract_boot_files(
        base, work / "probe", ctx.runner, ctx.image.identifier, kernel_of(base_manifest)
    )
    return accel.choose(requested, kernel, ctx.runner, ctx.cache_dir)
