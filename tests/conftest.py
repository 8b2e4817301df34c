"""Shared fixtures: real images built once per test session with the real tools.

Building a base takes about 1.5 minutes and a boot under TCG about 45 seconds, so the images are
built once per session and shared; tests that only need a file of some shape make their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from stage4 import api, config

VENV_BIN = Path(sys.executable).parent
STAGE4 = str(VENV_BIN / "stage4")
SHARED_CACHE = Path("~/.cache/stage4").expanduser()
# Downloads are shared with other runs; what stage4 builds (initramfs images, work folders) is not, so the
# code that builds them runs in every test session, whatever an earlier session left in ~/.cache.
SHARED_PARTS = ("apt", "sources", "probe", "accelerator.json")


def session_cache() -> Path:
    """This test session's stage4 cache folder (removed at the end of the session)."""
    cache = Path(tempfile.gettempdir()) / f"stage4-test-cache-{os.getpid()}"
    if not cache.is_dir():
        cache.mkdir()
        SHARED_CACHE.mkdir(parents=True, exist_ok=True)
        for part in SHARED_PARTS:
            (cache / part).symlink_to(SHARED_CACHE / part, target_is_directory=not part.endswith(".json"))
        (SHARED_CACHE / "apt").mkdir(exist_ok=True)
        (SHARED_CACHE / "sources").mkdir(exist_ok=True)
        (SHARED_CACHE / "probe").mkdir(exist_ok=True)
    return cache


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    cache = Path(tempfile.gettempdir()) / f"stage4-test-cache-{os.getpid()}"
    if cache.is_dir():
        subprocess.run(["rm", "-rf", "--one-file-system", str(cache)], check=False)


@dataclass
class BuiltImage:
    path: Path
    manifest: dict
    identifier: str
    filesystem: str
    config: config.Config
    output_dir: Path


def make_config(tmp: Path, images: dict, cache_dir: Path | None = None) -> config.Config:
    """A config like a user's stage4.toml, with the output in `tmp` and this session's cache."""
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


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the layered-build fixtures: playbooks, a dracut module and a component with a kernel
    module (a copy, so that a test may change it)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("playbooks", "dracut", "component"):
        shutil.copytree(FIXTURES / name, root / name)
    return root


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The default image: Debian 12, ext4, identifier SLX_SYS."""
    return _build(tmp_path_factory.mktemp("base"), "debian-12", {"distribution": "debian-12"})


@pytest.fixture(scope="session")
def xfs_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The usegalaxy-style variant: xfs with the identifier 'system'."""
    return _build(
        tmp_path_factory.mktemp("xfs"),
        "debian-12-xfs",
        {"distribution": "debian-12", "filesystem": "xfs", "identifier": "system"},
    )


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
