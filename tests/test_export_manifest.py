"""Export publishes what the dev run built: the kernel and initramfs named by the image's manifest, the
identifier from the manifest, and refuses an initramfs without a configured dracut module (checked with
lsinitrd). Real initramfs images are built on the host with dracut and the fixture module `stage4test`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stage4.errors import InputError
from stage4.export.publish import publish

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODULE = ROOT / "tests/fixtures/dracut/modules.d/90stage4test"
DRACUT = Path("/usr/lib/dracut")
NAME = "stage4/debian-12.qcow2"


def build_initramfs(work: Path, output: Path, modules: str) -> Path:
    """A small initramfs made by the host's dracut from its own modules plus the fixture module."""
    base = work / "dracut"
    if not base.exists():
        (base / "modules.d").mkdir(parents=True)
        for entry in DRACUT.iterdir():
            if entry.name != "modules.d":
                (base / entry.name).symlink_to(entry)
        for module in (DRACUT / "modules.d").iterdir():
            (base / "modules.d" / module.name).symlink_to(module)
        (base / "modules.d" / FIXTURE_MODULE.name).symlink_to(FIXTURE_MODULE)
        (work / "conf.d").mkdir()
    subprocess.run(
        [
            "dracut",
            "--no-kernel",
            "--no-hostonly",
            "--no-early-microcode",
            "--no-compress",
            "--force",
            "--conf",
            "/dev/null",
            "--confdir",
            work / "conf.d",
            "-m",
            modules,
            output,
        ],
        env={**os.environ, "dracutbasedir": str(base)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    return output


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory) -> dict[str, Path]:
    """'with': zstd-compressed, with the fixture module (like the dev run's); 'without': no fixture module."""
    for tool in ("dracut", "lsinitrd", "zstd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install dracut-core zstd)")
    work = tmp_path_factory.mktemp("initramfs")
    plain = build_initramfs(work, work / "with.cpio", "bash base stage4test")
    subprocess.run(["zstd", "-q", "-T0", "-3", "--rm", plain, "-o", work / "with.img"], check=True)
    return {"with": work / "with.img", "without": build_initramfs(work, work / "without.img", "bash base")}


@pytest.fixture
def built(tmp_path, initramfs):
    """A layered build's output: prod.qcow2 (bytes only, not inspected) and prod.json."""
    out = tmp_path / "output/debian-12"
    (out / "artifacts").mkdir(parents=True)
    image = out / "prod.qcow2"
    image.write_bytes(os.urandom(3 << 20))
    kernel = out / "artifacts/vmlinuz-6.1.0-test"
    kernel.write_bytes(os.urandom(200_000))
    initrd = out / "artifacts/initrd.img-6.1.0-test"
    shutil.copyfile(initramfs["with"], initrd)
    manifest = {
        "kind": "prod",
        "name": "debian-12",
        "identity": "prod-identity-123",
        "identifier": "system",
        "dracut_modules": ["stage4test"],
        "kernel": str(kernel),
        "initramfs": str(initrd),
        "kernel_version": "6.1.0-test",
        "image": {"file": "prod.qcow2", "size": image.stat().st_size},
    }
    (out / "prod.json").write_text(json.dumps(manifest))
    return image, manifest


def write_manifest(target: Path, **changes) -> dict:
    path = target.with_suffix(".json")
    manifest = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps(manifest))
    return manifest


def visible(store: Path) -> list[str]:
    return sorted(
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store).parts)
    )


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stage4", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_the_dev_runs_kernel_and_initramfs_are_published(tmp_path, built):
    image, manifest = built
    store = tmp_path / "store"
    store.mkdir()
    pub = publish(image, store, NAME, servers=["10.0.0.1"], check_image=False)
    meta = store / ".stage4" / NAME
    assert (meta / "kernel.r1").read_bytes() == Path(manifest["kernel"]).read_bytes()
    assert (meta / "initrd.r1").read_bytes() == Path(manifest["initramfs"]).read_bytes()
    listing = subprocess.run(
        ["lsinitrd", "-f", "usr/lib/dracut/modules.txt", meta / "initrd.r1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "stage4test" in listing
    assert pub.identifier == "system" and pub.source_identity == "prod-identity-123"
    assert "SLX_SYSTEM_PARTITION_IDENTIFIER='system'\n" in (meta / "config.r1").read_text()
    lines = (meta / "ipxe.r1").read_text().splitlines()
    assert lines[0] == "#!ipxe" and lines[1].startswith("# ") and "prod-identity-123" in lines[1]
    assert lines[2:] == [
        (
            "kernel http://${slxsrv}/${slxbase}/kernel.r1 initrd=initrd.r1 "
            "slxsrv=${slxsrv} slxbase=${slxbase} "
            "BOOTIF=01-${mac:hexhyp} SLX_DNBD3_RID=1"
        ),
        "initrd http://${slxsrv}/${slxbase}/initrd.r1",
        "boot",
    ]
    record = json.loads((meta / "publication.r1.json").read_text())
    assert record["source"]["manifest"] == str(image.with_suffix(".json"))
    assert record["source"]["dracut_modules"] == ["stage4test"] and record["ipxe"] == "ipxe.r1"
    assert record["boot_files"]["initrd"]["source"] == manifest["initramfs"]


def test_an_initramfs_without_a_configured_module_is_refused(tmp_path, built, initramfs):
    image, manifest = built
    shutil.copyfile(initramfs["without"], manifest["initramfs"])
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(
        InputError,
        match="^"
        + re.escape(
            f"initramfs {manifest['initramfs']} lacks the configured dracut module 'stage4test'; "
            "nothing published"
        )
        + "$",
    ) as info:
        publish(image, store, NAME, check_image=False)
    message = str(info.value)
    assert "\n" not in message and manifest["initramfs"] in message and "'stage4test'" in message
    result = cli("export", str(image), "--store", str(store), "--name", NAME)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "lacks the configured dracut module 'stage4test'" in result.stderr
    assert list(store.iterdir()) == []
    write_manifest(image, dracut_modules=["stage4test", "dnbd3-rootfs"])
    shutil.copyfile(initramfs["with"], manifest["initramfs"])
    with pytest.raises(InputError, match="lacks the configured dracut module 'dnbd3-rootfs'"):
        publish(image, store, NAME, check_image=False)
    Path(manifest["initramfs"]).write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="lsinitrd cannot read it"):
        publish(image, store, NAME, check_image=False)
    assert list(store.iterdir()) == []


def test_kernel_and_initrd_given_are_published_as_before(tmp_path, built, initramfs):
    """--kernel/--initrd: those files, no module check; identifier and identity still from the manifest."""
    image, _ = built
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 1000)
    store = tmp_path / "store"
    store.mkdir()
    pub = publish(image, store, NAME, kernel=kernel, initrd=initramfs["without"], check_image=False)
    meta = store / ".stage4" / NAME
    assert (meta / "initrd.r1").read_bytes() == initramfs["without"].read_bytes()
    assert pub.identifier == "system" and pub.source_identity == "prod-identity-123"


def test_a_base_manifest_gives_the_identity_only(tmp_path):
    image = tmp_path / "base.qcow2"
    image.write_bytes(os.urandom(1 << 20))
    image.with_suffix(".json").write_text(json.dumps({"kind": "base", "identity": "base-id"}))
    store = tmp_path / "store"
    store.mkdir()
    pub = publish(image, store, NAME, boot_files=False, check_image=False)
    assert pub.source_identity == "base-id" and pub.identifier == "SLX_SYS" and pub.kernel is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"identifier": None}, "key 'identifier'"),
        ({"dracut_modules": "stage4test"}, "key 'dracut_modules'"),
        ({"kernel": "/nonexistent/vmlinuz"}, "kernel /nonexistent/vmlinuz: no such file"),
        ({"image": {"size": 5}}, "describes an image of 5 bytes"),
    ],
)
def test_a_wrong_manifest_is_one_line_naming_the_key(tmp_path, built, changes, message):
    image, _ = built
    write_manifest(image, **changes)
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(InputError, match=message) as info:
        publish(image, store, NAME, check_image=False)
    assert "\n" not in str(info.value) and str(image.with_suffix(".json")) in str(info.value)
    assert list(store.iterdir()) == []
