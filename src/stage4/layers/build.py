"""Building the dev and prod layers on a finished base.

dev: a qcow2 overlay on the base, provisioned with Ansible (the user's dev playbooks, then the shipped
`components` and `initramfs` roles); its kernel, initramfs and component artifacts are extracted without
booting it and it is thrown away (kept with --keep-dev). prod: a fresh overlay on the base with the
artifacts installed, the user's prod playbooks and the shipped `cleanup` role, flattened into one
standalone zstd qcow2. Work files live in the cache; the output directory only receives finished files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stage4 import __version__
from stage4.boot import accel
from stage4.builders.base import BaseResult
from stage4.builders.bootstrap import installed_packages
from stage4.config import ImageConfig, LayerConfig, MachineConfig, Way
from stage4.errors import StepFailed
from stage4.fsutil import place_atomically, remove_tree, sha256_file, temporary_sibling, write_json_atomically
from stage4.image.files import extract_boot_files
from stage4.layers import chain, extract, overlay
from stage4.layers.extract import OUT_IN_IMAGE
from stage4.provisioning import ansible, attach, packer_way, sources, vm
from stage4.runner import Runner



@dataclass
class LayeredResult:
    """A layered image: the flattened prod image and what each layer did."""

    name: str
    image: Path
    manifest: dict
    reused: bool
    base: BaseResult
    dev_manifest: dict
    artifacts: dict
    built: list[str] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return self.manifest["identity"]

    @property
    def artifacts_dir(self) -> Path:
        return self.image.parent / chain.ARTIFACTS_DIR


@dataclass
class LayerJob:
    name: str
    image: ImageConfig
    machine: MachineConfig
    source: str
    output_dir: Path
    cache_dir: Path
    runner: Runner
    base: BaseResult
    rebuild: set[str] = field(default_factory=set)
    keep_dev: bool = False

    @property
    def image_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def kernel(self) -> str:
        return self.base.manifest["kernel_versions"][-1]

    @property
    def part(self) -> attach.RootPartition:
        return attach.RootPartition.from_manifest(self.base.manifest, self.image.identifier,
                                                  self.image.filesystem.value)

    @property
    def work(self) -> Path:
        # One work folder per image and output folder: builds into other output folders do not collide.
        where = hashlib.sha256(str(self.output_dir.absolute()).encode()).hexdigest()[:12]
        return self.cache_dir / "work" / f"{self.name}-layers-{where}"

    @property
    def apt_cache(self) -> Path:
        return self.cache_dir / "apt" / self.image.distribution


def identities(image: ImageConfig, base: BaseResult) -> tuple[str, str]:
    kernel = base.manifest["kernel_versions"][-1]
    dev_id = chain.dev_identity(image, base.identity, kernel)
    return dev_id, chain.prod_identity(image, base.identity, dev_id)


def build_layers(job: LayerJob) -> LayeredResult:
    display = job.runner.display
    dev_id, prod_id = identities(job.image, job.base)
    forced = set(job.rebuild)
    if "base" in forced or not job.base.reused:
        forced |= {"dev", "prod"}
    if "dev" in forced:
        forced.add("prod")
    built: list[str] = []

    artifacts = None if "dev" in forced else chain.artifacts_intact(job.image_dir, dev_id)
    dev_manifest = chain.read_json(job.image_dir / chain.DEV_MANIFEST) or {}
    if artifacts is not None and job.keep_dev and not (job.image_dir / chain.DEV_IMAGE).is_file():
        artifacts = None  # asked to keep the dev layer, which was thrown away: build it again
    if artifacts is None:
        dev_manifest, artifacts = build_dev(job, dev_id)
        built.append("dev")
        forced.add("prod")
    else:
        display.info(f"{job.name}: dev {dev_id[:16]} is up to date, reusing its artifacts")

    prod = None if "prod" in forced else chain.prod_intact(job.image_dir, prod_id)
    if prod is None:
        prod = build_prod(job, prod_id, dev_id, artifacts)
        built.append("prod")
    else:
        display.info(f"{job.name}: prod {prod_id[:16]} is up to date, reusing {job.image_dir / chain.PROD_IMAGE}")
    return LayeredResult(job.name, job.image_dir / chain.PROD_IMAGE, prod, not built, job.base, dev_manifest,
                         artifacts, built)


def _check_playbooks(job: LayerJob, layer_name: str, layer: LayerConfig) -> None:
    for playbook in layer.playbooks:
        if not playbook.is_file():
            raise StepFailed(f"{job.name}: {layer_name}: provision",
                             f"playbook {playbook} does not exist (images.{job.name}.{layer_name}.playbooks)",
                             job.runner.log_path)


def _fresh_work_dir(job: LayerJob, layer_name: str) -> Path:
    """The layer's work folder, emptied of anything an earlier, interrupted run left."""
    work = job.work / layer_name
    remove_tree(work)
    work.mkdir(parents=True)
    return work


def build_dev(job: LayerJob, dev_id: str) -> tuple[dict, dict]:
    layer = job.image.dev or LayerConfig()
    _check_playbooks(job, "dev", layer)
    display, runner = job.runner.display, job.runner
    work = _fresh_work_dir(job, "dev")
    timings: dict[str, float] = {}
    try:
        overlay_path = work / chain.DEV_IMAGE
        with display.step(f"{job.name}: dev: fetch sources"), _timed(timings, "sources"):
            step = f"{job.name}: dev: fetch sources"
            components = []
            for name, component in sorted(job.image.components.items()):
                tarball = sources.fetch(name, component.source, work / "sources", runner, f"{step} ({name})",
                                        job.cache_dir)
                components.append({"name": name, "tarball": str(tarball), "build": list(component.build),
                                   "artifacts": [a.model_dump(mode="json") for a in component.artifacts],
                                   "build_packages": list(component.build_packages)})
            initramfs_src = job.image.initramfs.effective_source
            initramfs_tar = sources.fetch("stage4-initramfs", initramfs_src, work / "sources", runner,
                                          f"{step} (initramfs)", job.cache_dir)
            has_script = "build-initramfs.sh" in sources.top_level(initramfs_tar)
        overlay.create(job.base.image, overlay_path, runner, f"{job.name}: dev: create overlay")
        in_layer = [{"name": name, "file": f"components/{name}/{artifact.path}",
                     **artifact.model_dump(mode="json")}
                    for name, component in sorted(job.image.components.items()) for artifact in component.artifacts]
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": job.kernel,
            "stage4_out": OUT_IN_IMAGE,
            "stage4_packages": list(layer.packages),
            "stage4_components": components,
            "stage4_artifacts": _installs(in_layer, f"{OUT_IN_IMAGE}/"),
            "stage4_artifacts_in_layer": True,
            "stage4_initramfs": {"tarball": str(initramfs_tar), "has_script": has_script,
                                 "modules": list(job.image.initramfs.dracut_modules),
                                 "script_args": list(job.image.initramfs.script_args)},
        }
        plays = ansible.site([ansible.play("stage4 dev: packages", ["stage4_packages"])], list(layer.playbooks),
                             [ansible.play("stage4 dev: components", ["stage4_components", "stage4_install_artifacts"]),
                              ansible.play("stage4 dev: initramfs", ["stage4_initramfs"])])
        with _timed(timings, "provision"):
            provision(job, "dev", layer, overlay_path, plays, variables, work)
        step = f"{job.name}: dev: extract kernel, initramfs and artifacts"
        staging = work / "artifacts"
        with display.step(step), _timed(timings, "extract"), \
                attach.attached(overlay_path, job.part, work / "attach", runner, writable=False, step=step) as root:
            artifacts = extract.extract(root, job.image, job.kernel, dev_id, staging, runner, step)
            packages = _packages(root, runner)
        job.image_dir.mkdir(parents=True, exist_ok=True)
        _replace_dir(staging, job.image_dir / chain.ARTIFACTS_DIR)
        kept = job.image_dir / chain.DEV_IMAGE
        if job.keep_dev:
            with temporary_sibling(kept) as partial:
                shutil.copyfile(overlay_path, partial)
                place_atomically(partial, kept)
        else:
            kept.unlink(missing_ok=True)
        manifest = {
            "kind": "dev", "name": job.name, "identity": dev_id, "parent": job.base.identity,
            "way": layer.way.value, "kernel_version": job.kernel,
            "playbooks": [str(p) for p in layer.playbooks], "packages_requested": list(layer.packages),
            "components": sorted(job.image.components), "dracut_modules": list(job.image.initramfs.dracut_modules),
            "initramfs_source": job.image.initramfs.effective_source.describe(),
            "packages": packages, "kept": str(kept) if job.keep_dev else None,
            "created": _now(), "stage4_version": __version__, "timings_seconds": timings,
        }
        write_json_atomically(job.image_dir / chain.DEV_MANIFEST, manifest)
    finally:
        remove_tree(work)
    return manifest, artifacts


def build_prod(job: LayerJob, prod_id: str, dev_id: str, artifacts: dict) -> dict:
    layer = job.image.prod or LayerConfig()
    _check_playbooks(job, "prod", layer)
    display, runner = job.runner.display, job.runner
    work = _fresh_work_dir(job, "prod")
    timings: dict[str, float] = {}
    artifacts_dir = job.image_dir / chain.ARTIFACTS_DIR
    try:
        overlay_path = work / "prod-overlay.qcow2"
        overlay.create(job.base.image, overlay_path, runner, f"{job.name}: prod: create overlay")
        installs = _installs([a for name in sorted(artifacts["components"]) for a in artifacts["components"][name]],
                             f"{artifacts_dir}/")
        runtime = sorted({p for c in job.image.components.values() for p in c.runtime_packages})
        variables = {
            **layer.vars,
            "stage4_way": layer.way.value,
            "stage4_kernel_version": job.kernel,
            "stage4_packages": sorted({*layer.packages, *runtime}),
            "stage4_artifacts": installs,
        }
        plays = ansible.site([ansible.play("stage4 prod: packages and artifacts",
                                           ["stage4_packages", "stage4_install_artifacts"])],
                             list(layer.playbooks),
                             [ansible.play("stage4 prod: cleanup", ["stage4_cleanup"])])
        with _timed(timings, "provision"):
            provision(job, "prod", layer, overlay_path, plays, variables, work)
        step = f"{job.name}: prod: package list"
        with attach.attached(overlay_path, job.part, work / "attach", runner, writable=False, step=step) as root:
            packages = _packages(root, runner)
        target = job.image_dir / chain.PROD_IMAGE
        step = f"{job.name}: prod: flatten into a standalone qcow2"
        with temporary_sibling(target) as partial, display.step(step), _timed(timings, "flatten"):
            facts = overlay.flatten(overlay_path, partial, runner, step)
            manifest = {
                "kind": "prod", "name": job.name, "identity": prod_id, "parent": job.base.identity,
                "dev_identity": dev_id, "way": layer.way.value, "kernel_version": job.kernel,
                "identifier": job.image.identifier, "filesystem": job.image.filesystem.value,
                "kernel": str(artifacts_dir / artifacts["kernel"]),
                "initramfs": str(artifacts_dir / artifacts["initramfs"]),
                "dracut_modules": list(job.image.initramfs.dracut_modules),
                "playbooks": [str(p) for p in layer.playbooks], "packages_requested": variables["stage4_packages"],
                "artifacts_installed": installs, "packages": packages,
                "image": {"file": chain.PROD_IMAGE, "format": "qcow2", "compat": "1.1", "compression": "zstd",
                          "virtual_size": facts["virtual-size"], "size": partial.stat().st_size,
                          "sha256": sha256_file(partial)},
                "created": _now(), "stage4_version": __version__, "timings_seconds": timings,
            }
            place_atomically(partial, target)
        write_json_atomically(job.image_dir / chain.PROD_MANIFEST, manifest)
    finally:
        remove_tree(work)
    return manifest


def provision(job: LayerJob, layer_name: str, layer: LayerConfig, overlay_path: Path, plays: list[dict],
              variables: dict, work: Path) -> None:
    """Run the plays on the layer the configured way."""
    runner = job.runner
    way = layer.way
    if way is Way.chroot and (reason := attach.chroot_unavailable()):
        runner.display.info(f"{job.name}: {layer_name}: the chroot way cannot serve here ({reason}); using the VM way")
        way = Way.vm
    step = f"{job.name}: {layer_name}: provision ({way.value})"
    with runner.display.step(step):
        if way is Way.chroot:
            with attach.attached(overlay_path, job.part, work / "attach", runner, writable=True, step=step) as root, \
                    attach.chroot_ready(root, runner, job.apt_cache, step=step):
                try:
                    ansible.run(ansible.Target("chroot", root=root), plays, variables, work / "ansible", runner, step)
                finally:
                    for leftover in (root / ansible.REMOTE_TMP.lstrip("/"), root / "root/.ansible"):
                        remove_tree(leftover)
        elif way is Way.packer:
            packer_way.provision(overlay_path, job.part, choose_accelerator(job, work), job.machine, plays, variables,
                                 work, runner, step, f"{job.name}: {layer_name}")
        else:
            accelerator = choose_accelerator(job, work)
            with vm.running(overlay_path, job.part, accelerator, job.machine.cpus, job.machine.memory >> 20,
                            work, runner, step) as target:
                ansible.run(target, plays, variables, work / "ansible", runner, step)


def choose_accelerator(job: LayerJob, work: Path) -> str:
    requested = job.machine.accelerator.value
    if requested != "auto":
        return requested
    kernel, _ = extract_boot_files(job.base.image, work / "probe", job.runner, job.image.identifier, job.kernel)
    return accel.choose(requested, kernel, job.runner, job.cache_dir)


def _installs(artifacts: list[dict], prefix: str) -> list[dict]:
    """What the install role needs of each artifact; `prefix` locates the files (host or layer)."""
    return [{"src": prefix + a["file"], "kind": a["kind"], "dest": a["dest"], "mode": a["mode"]} for a in artifacts]


def _packages(root: Path, runner: Runner) -> dict[str, str]:
    return installed_packages(root, runner) if (root / "var/lib/dpkg/status").is_file() else {}


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished directory into place; the old one is renamed away first, then removed."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    remove_tree(partial)
    shutil.copytree(staging, partial)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    remove_tree(old)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        timings[key] = round(time.monotonic() - start, 1)
