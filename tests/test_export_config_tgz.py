"""`stage4 export --config-tgz`: the site's config.tgz published as config.tgz.r<RID> beside the revision's
boot files and named by SLX_CONFIG_NAME in its config (local and remote stores), refused in one line when
it is not a gzip'ed tar with members below the root, and served by `stage4 netboot`."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import pytest

from stage4.boot import netboot
from stage4.dnbd3.store import Store
from stage4.export.publish import publish
from stage4.export.revisions import prune, states
from stage4.runner import Runner
from tests.archives import tgz
from tests.transports import LocalShellTransport

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "src/stage4/stage3/modules.d/90dnbd3-rootfs/stage4-lib.sh"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


@pytest.fixture
def site_tgz(tmp_path: Path) -> Path:
    return tgz(tmp_path / "site.tgz", {"etc/stage4-site": b"site\n", "opt/openslx/x": b""})


def _slx(config: str, key: str) -> str:
    """What stage 3's parser reads out of a published config."""
    return subprocess.run(
        ["bash", "-c", f'. {LIB}; slx_parse_config; printf %s "${key}"'],
        input=config,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_published_beside_the_revision_and_named_by_its_config(
    tmp_path: Path, image: Path, site_tgz: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    pub = publish(image, store, "s/img.qcow2", check_image=False, boot_files=False, config_tgz=site_tgz)
    boot = store / ".stage4/s/img.qcow2"
    assert pub.config_tgz == str(boot / "config.tgz.r1")
    assert (boot / "config.tgz.r1").read_bytes() == site_tgz.read_bytes()
    config = (boot / "config.r1").read_text()
    assert _slx(config, "SLX_CONFIG_NAME") == "config.tgz.r1"
    record = json.loads((boot / "publication.r1.json").read_text())
    assert record["boot_files"]["config.tgz"]["file"] == "config.tgz.r1"
    # a revision without it names none; the next one with it gets its own file
    publish(image, store, "s/img.qcow2", check_image=False, boot_files=False)
    assert "SLX_CONFIG_NAME" not in (boot / "config.r2").read_text()
    publish(image, store, "s/img.qcow2", check_image=False, boot_files=False, config_tgz=site_tgz)
    assert _slx((boot / "config.r3").read_text(), "SLX_CONFIG_NAME") == "config.tgz.r3"
    # it is part of the revision: missing, the revision is incomplete; pruned with it
    assert [s.complete for s in states(Store(store), "s/img.qcow2")] == [True, True, True]
    (boot / "config.tgz.r3").rename(tmp_path / "aside")
    assert [s.complete for s in states(Store(store), "s/img.qcow2")] == [True, True, False]
    (tmp_path / "aside").rename(boot / "config.tgz.r3")
    assert prune(store, "s/img.qcow2", 1) == [1, 2]
    assert not (boot / "config.tgz.r1").exists() and (boot / "config.tgz.r3").exists()
    assert not [p for p in store.rglob("*.part")]


def test_remote_store_publishes_it_too(tmp_path: Path, image: Path, site_tgz: Path) -> None:
    store = tmp_path / "remote"
    store.mkdir()
    runner = Runner()
    kwargs = {"check_image": False, "boot_files": False, "runner": runner, "config_tgz": site_tgz}
    publish(image, f"fakehost:{store}", "r/img.qcow2", transport=LocalShellTransport(runner), **kwargs)
    boot = store / ".stage4/r/img.qcow2"
    assert (boot / "config.tgz.r1").read_bytes() == site_tgz.read_bytes()
    assert _slx((boot / "config.r1").read_text(), "SLX_CONFIG_NAME") == "config.tgz.r1"
    assert not [p for p in store.rglob("*") if "stage4-" in p.name]


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    gzipped_text = tmp_path / "notes.txt.gz"
    gzipped_text.write_bytes(gzip.compress(b"not a tar\n" * 100))
    plain_tar = tmp_path / "plain.tar"
    with tarfile.open(plain_tar, "w") as archive:
        archive.addfile(tarfile.TarInfo("etc/x"), io.BytesIO())
    return {
        "missing": (tmp_path / "missing.tgz", "no such file"),
        "text": (text, "not a gzip'ed tar archive"),
        "gzip, not tar": (gzipped_text, "not a gzip'ed tar archive"),
        "tar, not gzip": (plain_tar, "not a gzip'ed tar archive"),
        "absolute": (tgz(tmp_path / "abs.tgz", {"/etc/passwd": b""}), "member '/etc/passwd' is outside"),
        "dot-dot": (tgz(tmp_path / "up.tgz", {"etc/../../x": b""}), "member 'etc/../../x' is outside"),
    }


def test_a_bad_file_is_one_line_and_nothing_is_published(tmp_path: Path, image: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for case, (path, reason) in _bad_files(tmp_path).items():
        result = subprocess.run(
            [*[sys.executable, "-m", "stage4"], "export", str(image), "--store", str(store), "--name", "x"]
            + ["--no-boot-files", "--config-tgz", str(path)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            timeout=120,
        )
        assert result.returncode == 2, (case, result.stderr)
        assert result.stderr.count("\n") == 1, (case, result.stderr)
        assert f"--config-tgz {path}: {reason}" in result.stderr, case
        assert "Traceback" not in result.stderr
        assert list(store.iterdir()) == [], case


def test_netboot_serves_the_tarball_the_config_names(tmp_path: Path, image: Path, site_tgz: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    publish(image, store, "s/img.qcow2", check_image=False, boot_files=False, config_tgz=site_tgz)
    boot = store / ".stage4/s/img.qcow2"
    for kind in ("kernel", "initrd"):
        (boot / f"{kind}.r1").write_bytes(kind.encode())
    (boot / "ipxe.r1").write_text("#!ipxe\nkernel http://x/kernel.r1\ninitrd http://x/initrd.r1\n")
    revision = netboot.find_revision(store, "s/img.qcow2", 1, None)
    with netboot.forwards(revision, [("127.0.0.1", 1)], tmp_path) as fwd:
        base = f"http://127.0.0.1:{fwd.http.port}/{netboot.SLXBASE}"
        with urllib.request.urlopen(f"{base}/config.tgz.r1", timeout=10) as reply:
            assert reply.read() == site_tgz.read_bytes()
        with urllib.request.urlopen(f"{base}/config", timeout=10) as reply:
            assert "SLX_CONFIG_NAME='config.tgz.r1'" in reply.read().decode()
    assert netboot.config_tarball("SLX_CONFIG_NAME='config.tgz.r1'\n", boot) == boot / "config.tgz.r1"
    assert netboot.config_tarball("SLX_CONFIG_NAME='config.tgz.r9'\n", boot) is None  # not there
    assert netboot.config_tarball("SLX_CONFIG_NAME='../../etc/passwd'\n", boot) is None
    assert netboot.config_tarball("SLX_DNBD3_RID='1'\n", boot) is None


def test_a_leftover_tarball_takes_its_revision_number(tmp_path: Path, image: Path, site_tgz: Path) -> None:
    """config.tgz.r<N> is a trace of revision N (a crashed export's, say): N is never given out again."""
    store = tmp_path / "store"
    boot = store / ".stage4/s/img.qcow2"
    boot.mkdir(parents=True)
    (boot / "config.tgz.r4").write_bytes(b"old")
    assert publish(image, store, "s/img.qcow2", check_image=False, boot_files=False).rid == 5
    remote = tmp_path / "remote"
    (remote / ".stage4/s/img.qcow2").mkdir(parents=True)
    (remote / ".stage4/s/img.qcow2/config.tgz.r7").write_bytes(b"old")
    runner = Runner()
    pub = publish(
        image,
        f"fakehost:{remote}",
        "s/img.qcow2",
        check_image=False,
        boot_files=False,
        runner=runner,
        transport=LocalShellTransport(runner),
        config_tgz=site_tgz,
    )
    assert pub.rid == 8
    assert (remote / ".stage4/s/img.qcow2/config.tgz.r7").read_bytes() == b"old"
