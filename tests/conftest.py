"""Shared fixtures: real images built once per test run with the real tools, shared by every worker.

Building a base takes about two minutes and a boot under TCG about one, so the expensive artefacts are
made once per run: one bootstrapped base per filesystem (`base_image`, `xfs_image`) and one layered
image (`layered`). The suite runs on two pytest-xdist workers (pyproject.toml); both ask for the same
fixtures, and stage4's own per-image build lock makes the second one wait and then reuse what the first
built, exactly as two `stage4 build` runs of one image on a build host do. Tests that build a variant do
it in an image folder of their own, seeded with the finished steps they do not change (`seed_steps`),
so that no test changes what another worker is reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.fsutil import exclusive_lock
from stage4.pipeline import ImageResult

VENV_BIN = Path(sys.executable).parent
STAGE4 = str(VENV_BIN / "stage4")
SHARED_CACHE = Path("~/.cache/stage4").expanduser()
# Downloads are shared with other runs; what stage4 builds (initramfs images, work folders) is not, so the
# code that builds them runs in every test run, whatever an earlier run left in ~/.cache.
SHARED_PARTS = ("apt", "sources", "probe", "accelerator.json")
FIXTURES = Path(__file__).parent / "fixtures"
# Every worker of one run shares this id: the controller sets it before the workers start.
RUN_ID = "STAGE4_TEST_RUN"


# Test modules by when they should start: the two xdist workers take modules in this order (pyproject:
# --dist loadfile, no reordering), so the longest chains of builds and boots start first and the
# bootstrap kills of test_recovery run while the other worker builds the session's base.
SCHEDULE = (
    "test_netboot.py",
    "test_recovery.py",
    "test_desktop.py",
    "test_layers.py",
    "test_base_image.py",
    "test_variants.py",
    "test_layers_vm.py",
    "test_interrupt.py",
    "test_mltk_image.py",
    "test_rollouts.py",
    "test_export_base_image.py",
)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(RUN_ID, str(os.getpid()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SCHEDULE.index(name) if name in SCHEDULE else len(SCHEDULE)

    items.sort(key=rank)  # stable: the tests of a module keep their order


def _cache_prefix() -> Path:
    return Path(tempfile.gettempdir()) / f"stage4-test-cache-{os.environ[RUN_ID]}"


def session_cache(variant: str = "") -> Path:
    """This test run's stage4 cache folder, shared by its workers (removed at the end of the run); with
    `variant`, another one of the run (same downloads), for builds that need not wait for the others."""
    prefix = _cache_prefix()
    cache = prefix.with_name(f"{prefix.name}-{variant}") if variant else prefix
    with exclusive_lock(cache.with_name(cache.name + ".lock"), lambda: None):
        if not cache.is_dir():
            SHARED_CACHE.mkdir(parents=True, exist_ok=True)
            for part in ("apt", "sources", "probe"):
                (SHARED_CACHE / part).mkdir(exist_ok=True)
            partial = cache.with_name(cache.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            for part in SHARED_PARTS:
                target = SHARED_CACHE / part
                (partial / part).symlink_to(target, target_is_directory=not part.endswith(".json"))
            partial.rename(cache)
    return cache


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # a worker: the controller removes the run's cache once every worker has finished
    prefix = _cache_prefix()
    # This run's caches only: `-1817*` would also match the caches of a run 18170 still building.
    for pattern in (prefix.name, f"{prefix.name}-*", f"{prefix.name}.*"):
        for cache in prefix.parent.glob(pattern):
            subprocess.run(["rm", "-rf", "--one-file-system", str(cache)], check=False)


def run_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this run that every worker finds at the same path (the workers' temp folders share a
    parent); made once."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


@dataclass
class BuiltImage:
    path: Path
    manifest: dict
    identifier: str
    filesystem: str
    config: config.Config
    output_dir: Path


def make_config(tmp: Path, images: dict, cache_dir: Path | None = None) -> config.Config:
    """A config like a user's stage4.toml, with the output in `tmp` and this run's cache."""
    data = {
        "build": {"output_dir": str(tmp / "output"), "cache_dir": str(cache_dir or session_cache())},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": images,
    }
    return config.from_dict(data, str(tmp / "stage4.toml"))


def _build(tmp: Path, name: str, image: dict) -> BuiltImage:
    cfg = make_config(tmp, {name: image})
    (result,) = api.build(cfg, [name])
    manifest = json.loads((result.image.parent / "base.json").read_text())
    return BuiltImage(
        result.image,
        manifest,
        cfg.images[name].identifier,
        cfg.images[name].filesystem.value,
        cfg,
        cfg.build.output_dir,
    )


def seed_steps(source: Path, target: Path, steps: tuple[str, ...] = ("base",)) -> Path:
    """Copy the finished `steps` of one image folder into another (hard links, as `cp -l` of an output
    folder): a build there reuses them, since their identities and files are unchanged. stage4 replaces a
    step's files by renaming new ones into place, so a build in `target` never writes into `source`."""
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
        manifest = source / f"{step}.json"
        for relative in json.loads(manifest.read_text())["files"]:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(source / relative, target / relative)
        shutil.copyfile(manifest, target / manifest.name)
    return target


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the layered-build fixtures: playbooks, a dracut module and a component with a kernel
    module (a copy, so that a test may change it)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("playbooks", "dracut", "component"):
        shutil.copytree(FIXTURES / name, root / name)
    return root


def layered_image_config(project: Path, prod_text: str = "prod v1", extra: dict | None = None) -> dict:
    """The layered fixture image: a component with a kernel module and a program, a dracut module that
    prints a marker while the initramfs runs, a file written by the prod playbook."""
    return {
        "distribution": "debian-12",
        "dev": {"playbooks": [str(project / "playbooks/dev.yml")]},
        "prod": {
            "playbooks": [str(project / "playbooks/prod.yml")],
            "vars": {"stage4_fixture_text": prod_text},
        },
        "initramfs": {"dracut_modules": ["stage4test"], "source": {"path": str(project / "dracut")}},
        "components": {
            "fixture": {
                "source": {"path": str(project / "component")},
                "build": ['make -C "$KDIR" M="$PWD" modules', "gcc -O2 -o stage4-hello hello.c"],
                "artifacts": [
                    {"path": "stage4hello.ko", "kind": "module"},
                    {"path": "stage4-hello", "dest": "/usr/local/bin/stage4-hello", "mode": "0755"},
                ],
            }
        },
        **(extra or {}),
    }


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The default image: Debian 12, ext4, identifier SLX_SYS."""
    return _build(run_dir(tmp_path_factory, "base"), "debian-12", {"distribution": "debian-12"})


@pytest.fixture(scope="session")
def xfs_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The usegalaxy-style variant: xfs with the identifier 'system'."""
    return _build(
        run_dir(tmp_path_factory, "xfs"),
        "debian-12-xfs",
        {"distribution": "debian-12", "filesystem": "xfs", "identifier": "system"},
    )


@dataclass
class Layered:
    """The layered fixture image (dev layer kept), built once per run on the session's base."""

    config: config.Config
    result: ImageResult
    project: Path  # the fixture project it was built from (not to be changed)
    built: list[str]  # the steps the run's first build of it ran (on whichever worker)
    seconds: float  # and how long that took

    # The base's name: the image name is the base's hostname, which is part of the base's identity.
    NAME = "debian-12"

    def image_config(self, **kwargs) -> dict:
        return layered_image_config(self.project, **kwargs)

    @property
    def image_dir(self) -> Path:
        return self.result.image.parent


@pytest.fixture(scope="session")
def layered(base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Layered:
    require("qemu-storage-daemon", "losetup", "lsinitrd")
    root = run_dir(tmp_path_factory, "layered")
    project = root / "project"
    # What the first build of the run did is kept for the tests that check it, whichever worker built it.
    first = root / "first-build.json"
    with exclusive_lock(root / "build.lock", lambda: None):
        if not project.is_dir():
            for name in ("playbooks", "dracut", "component"):
                shutil.copytree(FIXTURES / name, project / name)
        cfg = make_config(root, {Layered.NAME: layered_image_config(project)})
        if not (cfg.build.output_dir / Layered.NAME / "base.json").is_file():
            seed_steps(base_image.path.parent, cfg.build.output_dir / Layered.NAME)
        started = time.monotonic()
        (result,) = api.build(cfg, [Layered.NAME], keep_dev=True)
        if not first.is_file():
            first.write_text(json.dumps({"built": result.built, "seconds": time.monotonic() - started}))
    assert result.base.reused and result.base.identity == base_image.manifest["identity"]
    return Layered(cfg, result, project, **json.loads(first.read_text()))


def variant(source: Path, folder: Path, image: dict, steps: tuple[str, ...] = ("base",)) -> config.Config:
    """A config for image `debian-12` (a variant of the base or layered image whose folder is `source`):
    output in `folder`, seeded with the finished `steps` of `source` that the variant does not change,
    and a cache of its own, so that its build runs beside the other worker's builds instead of waiting
    for them (stage4's build lock is per cache and image name)."""
    cache = session_cache(hashlib.sha256(bytes(folder)).hexdigest()[:12])
    cfg = make_config(folder, {Layered.NAME: image}, cache)
    seed_steps(source, cfg.build.output_dir / Layered.NAME, steps)
    return cfg


@pytest.fixture(scope="session")
def raw_copy(base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image converted to raw by qemu-img, for tools that read raw disks."""
    raw = tmp_path_factory.mktemp("raw") / "base.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base_image.path), str(raw)], check=True)
    return raw


# Tests that repeat a case the default run covers at another step (one more full build each) run only with
# STAGE4_TEST_FULL=1, keeping the default run (and CI) well inside its time budget.
full_matrix = pytest.mark.skipif(
    not os.environ.get("STAGE4_TEST_FULL"),
    reason="part of the full fault/rollout matrix: run with STAGE4_TEST_FULL=1 (one more build each)",
)


def run_stage4(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([STAGE4, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run ./install.sh")
