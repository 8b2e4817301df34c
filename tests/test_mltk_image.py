"""mltk modules built in dev and installed in prod, on the real Debian 12 base.

One image from the fixture tree (tests/fixtures/mltk: stage4-greeter requires stage4-hello, which compiles
a C program; the greeter has data/ with a systemd unit and a content package; stage4-helpers calls the
driver's helpers, module_init and chroot_run in dev, copy_kernel in prod; stage4-download downloads inside
both layers, served from the source cache this test seeds) and, where stage4's source cache
holds the public mltk, its modules haveged, zram-swap (an ash script) and demo-user (the useradd wrapper)
copied beside them: checked in the flattened prod image with debugfs on a raw copy (a tool stage4 did not
write), then booted once: the units the modules enabled must be active, or have exited with success, as
the guest's systemd reports them through the boot marker. With STAGE4_TEST_FULL, a second image runs the
public mltk's system-uuid (dmidecode from its REQUIRED_GIT).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stage4 import api
from stage4.boot import qemu
from stage4.errors import ConfigError, StepFailed
from stage4.provisioning.source_cache import Entry, SourceCache
from stage4.runner import Runner
from tests.conftest import FIXTURES, BuiltImage, full_matrix, session_cache, variant
from tests.readback import Debugfs, dpkg_stanza
from tests.upstream import require_git

FIXTURE = FIXTURES / "mltk"
MLTK_GIT = "https://github.com/bwLehrpool/mltk.git"
DMIDECODE_GIT = "https://git.savannah.nongnu.org/git/dmidecode.git"  # system-uuid -> dmidecode's REQUIRED_GIT
NAME = "debian-12"
UPSTREAM_MODULES = ["haveged", "zram-swap", "demo-user"]
DOWNLOADS = "https://downloads.stage4-fixture.invalid"
UNITS = re.compile(r"STAGE4-MLTK-UNITS(?P<units>( \S+=\S+)*)\s*$")
pytestmark = pytest.mark.slow


def mltk_image(base_image: BuiltImage, folder: Path, mltk: dict):
    # In `folder`, seeded with the session's base; no components (a short dev run), so the initramfs takes
    # the small fixture dracut module instead of dnbd3-rootfs (which needs them).
    initramfs = {"dracut_modules": ["stage4test"], "source": {"path": str(FIXTURES / "dracut")}}
    image = {"distribution": "debian-12", "components": {}, "initramfs": initramfs, "mltk": mltk}
    return variant(base_image.path.parent, folder, image)


def build(cfg) -> tuple[Path, dict, dict]:
    (result,) = api.build(cfg, [NAME])
    folder = result.image.parent
    return (
        result.image,
        json.loads((folder / "dev.json").read_text()),
        json.loads((folder / "prod.json").read_text()),
    )


def public_mltk(folder: Path) -> Path | None:
    """A checkout of the public mltk from this run's source cache (filled from the shared one, or
    fetched), or None where neither has it nor the network."""
    try:
        require_git(session_cache(), MLTK_GIT)
    except pytest.skip.Exception:
        return None
    cache, runner = SourceCache(session_cache()), Runner()
    entry = cache.git_entry(MLTK_GIT, "master")
    commit = entry.commit if entry else cache.fetch_from_network(MLTK_GIT, "master", runner, "fetch mltk")
    cache.checkout(MLTK_GIT, commit, folder, runner, "check out mltk")
    return folder


def seed_downloads(cache: SourceCache, folder: Path) -> list[Entry]:
    """What stage4-download fetches inside the layers: a tarball, a file and a git repository. The cache's
    sources are the machine's shared ones (conftest.session_cache): the caller forgets these entries."""
    (folder / "greeting").write_text("greeting 1 from the source cache\n")
    subprocess.run(["tar", "-C", folder, "-czf", folder / "greeting.tar.gz", "greeting"], check=True)
    entries = [cache.import_download(f"{DOWNLOADS}/greeting-1.tar.gz", folder / "greeting.tar.gz")]
    (folder / "post-copy.txt").write_text("post_copy's download\n")
    entries.append(cache.import_download(f"{DOWNLOADS}/post-copy.txt", folder / "post-copy.txt"))
    repo = folder / "stage4-tool"
    repo.mkdir()
    (repo / "README").write_text("stage4 tool\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    for argv in (["init", "-q"], ["add", "README"], ["commit", "-qm", "tool"]):
        subprocess.run(["git", "-C", repo, *argv], check=True, env={**env, "GIT_COMMITTER_EMAIL": "t@t"})
    entries.append(
        cache.import_git("https://git.stage4-fixture.invalid/stage4-tool.git", "HEAD", repo, Runner())
    )
    return entries


def unit_states(serial_log: Path) -> dict[str, str]:
    """The marker's report (one or more lines): each unit the modules enabled with its ActiveState/Result."""
    found = [UNITS.search(line) for line in serial_log.read_text(errors="replace").splitlines()]
    reports = [match["units"] for match in found if match]
    assert reports, f"no STAGE4-MLTK-UNITS line in {serial_log}"
    return dict(word.split("=", 1) for report in reports for word in report.split())


def link_target(fs: Debugfs, path: str) -> str:
    out = fs.run(f"stat {path}")
    return out.split('Fast link dest: "', 1)[1].split('"', 1)[0]


@pytest.fixture(scope="module")
def fixture_image(base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory):
    tree = tmp_path_factory.mktemp("mltk-tree") / "mltk"
    shutil.copytree(FIXTURE, tree, symlinks=True)
    upstream = public_mltk(tmp_path_factory.mktemp("mltk-public") / "mltk")
    for module in UPSTREAM_MODULES if upstream else []:
        shutil.copytree(upstream / "core/modules" / module, tree / "core/modules" / module, symlinks=True)
    modules = ["stage4-greeter", "stage4-helpers", "stage4-download", *(UPSTREAM_MODULES if upstream else [])]
    folder = tmp_path_factory.mktemp("mltk")
    cfg = mltk_image(base_image, folder, {"source": {"path": str(tree)}, "modules": modules})
    cache = SourceCache(cfg.build.cache_dir)
    seeded = seed_downloads(cache, tmp_path_factory.mktemp("mltk-downloads"))
    try:
        image, dev, prod = build(cfg)
        fs = Debugfs(image, tmp_path_factory.mktemp("mltk-raw"))
        yield fs, dev, prod, (cfg, image), bool(upstream)
        os.unlink(fs.raw)
    finally:
        for entry in seeded:
            cache.remove(entry.url, entry.ref, entry.sha256, Runner())


def test_fixture_modules_land_in_prod(fixture_image) -> None:
    fs, dev, prod, _, upstream = fixture_image
    mltk = dev["artifacts"]["mltk"]
    # the dependency first
    assert mltk["modules"][:4] == ["stage4-hello", "stage4-greeter", "stage4-helpers", "stage4-download"]
    assert mltk["content_packages"] == (["haveged", "tree"] if upstream else ["tree"])
    # The compiled binary (collected from the build tree) and the REQUIRED_FILES entry; nothing else of it.
    assert fs.stat("/usr/local/bin/stage4-mltk-hello")["mode"] == "0755"
    program = fs.raw.with_name("stage4-mltk-hello")
    fs.run(f"dump /usr/local/bin/stage4-mltk-hello {program}")
    program.chmod(0o755)
    assert (
        subprocess.run([program], capture_output=True, text=True, check=True).stdout == "stage4 mltk hello\n"
    )
    assert (
        fs.cat("/usr/local/share/stage4-mltk-hello/greeting").strip() == "hello from the stage4-hello module"
    )
    assert fs.stat("/usr/local/share/stage4-mltk-hello/leftover") is None
    # data/: the unit and its enabling link, as in the module.
    assert "ExecStart=/usr/local/bin/stage4-mltk-hello" in fs.cat(
        "/etc/systemd/system/stage4-greeter.service"
    )
    wants = "/etc/systemd/system/multi-user.target.wants/stage4-greeter.service"
    assert fs.stat(wants)["type"] == "symlink" and link_target(fs, wants) == "../stage4-greeter.service"
    # The unit calls /opt/openslx/bin/usleep, which no module ships: busybox's applets, all of them,
    # linked where bwLehrpool's stage 3 puts them (the boot test sees the unit succeed).
    assert mltk["applets"] == ["bin/usleep"]
    assert "busybox" in prod["packages"]
    for applet in ("/opt/openslx/bin/usleep", "/opt/openslx/sbin/brctl", "/opt/openslx/sbin/udhcpc"):
        assert link_target(fs, applet).endswith("/busybox"), applet
    # post_copy ran in prod, after the content package was installed as a real package.
    assert fs.cat("/etc/stage4-greeter.post-copy").strip() == "post_copy of stage4-greeter"
    status = fs.cat("/var/lib/dpkg/status")
    assert dpkg_stanza(status, "tree").get("Status") == "install ok installed"
    assert "tree" in prod["packages"]
    # The build tools stayed in dev; the image's own /bin link survived the copy.
    for package in ("gcc", "gcc-12", "libc6-dev", "build-essential"):
        assert package in dev["packages"] and package not in prod["packages"], package
        assert not dpkg_stanza(status, package), package
    assert fs.stat("/usr/bin/gcc") is None
    assert fs.stat("/bin")["type"] == "symlink"
    assert fs.stat("/var/lib/stage4") is None
    # module_init ran in dev before the build packages (tree came after it), with the general module.conf
    # only; chroot_run's script saw the build folder and wrote into it; copy_kernel found the image's
    # kernel in prod (post_copy went on to the users and groups).
    helpers = "/usr/local/share/stage4-helpers"
    assert fs.cat(f"{helpers}/init").strip() == "module_init: tree=none conf=[]"
    assert fs.cat(f"{helpers}/chroot").strip() == "chroot: module_init: tree=none conf=[]"
    assert "stage4-fixture-user:" in fs.cat("/etc/passwd")
    # Downloads inside the layers came from stage4's source cache: download_untar and git clone in dev,
    # post_copy's wget in prod (from what the dev result carried); none of it stayed in the image.
    share = "/usr/local/share/stage4-download"
    assert fs.cat(f"{share}/greeting") == "greeting 1 from the source cache\n"
    assert fs.cat(f"{share}/README") == "stage4 tool\n"
    assert fs.cat(f"{share}/post-copy") == "post_copy's download\n"
    # stage 3 writes over this one at netboot; mltk's scripts read it.
    assert fs.stat("/opt/openslx/config")["type"] == "regular" and fs.cat("/opt/openslx/config") == ""


def test_public_modules_runtime(fixture_image) -> None:
    fs, dev, prod, _, upstream = fixture_image
    if not upstream:
        require_git(session_cache(), MLTK_GIT)  # skips, saying how to seed the source cache
    mltk = dev["artifacts"]["mltk"]
    assert mltk["modules"][4:] == UPSTREAM_MODULES
    assert mltk["units"] == ["haveged.service", "stage4-greeter.service", "zram-swap.service"]
    # zram-swap's script is an ash script: busybox's ash, recorded by dev, provided by prod.
    assert mltk["ash"] is True
    assert fs.cat("/opt/openslx/scripts/systemd-zram_swap").startswith("#!/bin/ash")
    assert "ExecStart=/opt/openslx/scripts/systemd-zram_swap" in fs.cat(
        "/etc/systemd/system/zram-swap.service"
    )
    link = "/etc/systemd/system/sysinit.target.wants/zram-swap.service"
    assert link_target(fs, link) == "../zram-swap.service"
    assert "busybox" in prod["packages"]
    assert link_target(fs, "/usr/bin/ash").endswith("/busybox")  # /bin/ash, through /bin -> usr/bin
    # haveged: its content package installed as a package, its unit and enabling link from data/.
    assert fs.stat("/usr/sbin/haveged")["type"] == "regular"
    assert "haveged" in prod["packages"]
    assert "ExecStart=/usr/sbin/haveged" in fs.cat("/etc/systemd/system/haveged.service")
    link = "/etc/systemd/system/default.target.wants/haveged.service"
    assert link_target(fs, link) == "../haveged.service"
    # demo-user: a system user with its own group and home, its account locked.
    demo = [line for line in fs.cat("/etc/passwd").splitlines() if line.startswith("demo:")]
    assert len(demo) == 1 and int(demo[0].split(":")[2]) < 1000, demo
    assert fs.stat("/home/demo")["type"] == "directory"
    assert [
        line.split(":")[1] for line in fs.cat("/etc/shadow").splitlines() if line.startswith("demo:")
    ] == ["*"]


def test_failed_module_units_fail_the_boot() -> None:
    """What a boot makes of the marker's unit report (fast; the image test boots the real one)."""
    spec = qemu.BootSpec(None, "tcg", 1, 512, Path("serial.log"))
    report = (
        "[   76.3] STAGE4-MLTK-UNITS haveged.service=active/success stage4-greeter.service=inactive/success"
    )
    assert qemu.check_module_units(["x", report, "STAGE4-MLTK-UNITS graphical.target=active/"], spec) == {
        "haveged.service": "active/success",
        "stage4-greeter.service": "inactive/success",
        "graphical.target": "active/",
    }
    assert qemu.check_module_units(["no report"], spec) == {}
    broken = (
        "STAGE4-MLTK-UNITS haveged.service=active/success zram-swap.service=failed/exit-code "
        "x.service=active/timeout"
    )
    with pytest.raises(
        StepFailed,
        match=r"units did not all start: zram-swap.service is failed/exit-code, x.service is active/timeout",
    ):
        qemu.check_module_units([broken], spec)


def test_module_units_run_at_boot(fixture_image) -> None:
    _, dev, _, (cfg, image), upstream = fixture_image
    started = time.monotonic()
    booted = api.boot(cfg, image, via="kernel", timeout=600)
    print(f"boot to the marker: {time.monotonic() - started:.1f} s")
    states = unit_states(booted.serial_log)
    assert booted.module_units == states
    assert list(states) == dev["artifacts"]["mltk"]["units"]
    # The greeter is a oneshot that exits; haveged runs on; zram-swap's oneshot remains after exit.
    assert states.pop("stage4-greeter.service") == "inactive/success", states
    running = {"haveged.service": "active/success", "zram-swap.service": "active/success"}
    assert states == (running if upstream else {})
    log = booted.serial_log.read_text(errors="replace")
    assert f"STAGE4-USERSPACE-UP {booted.marker}" in log


def test_unknown_module_stops_before_the_layer(base_image: BuiltImage, tmp_path: Path) -> None:
    modules = ["stage4-greeter", "nosuch"]
    cfg = mltk_image(base_image, tmp_path, {"source": {"path": str(FIXTURE)}, "modules": modules})
    expected = (
        f"{cfg.source}: images.{NAME}.mltk.modules = {modules!r}: no module 'nosuch' in the mltk checkout "
        "(looked in core/modules, core/targets/stage4)"
    )
    with pytest.raises(ConfigError, match="^" + re.escape(expected)) as caught:
        api.build(cfg, [NAME])
    message = str(caught.value)
    assert "images.debian-12.mltk.modules" in message and "no module 'nosuch'" in message, message


@pytest.fixture(scope="module")
def upstream_image(base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory):
    require_git(session_cache(), MLTK_GIT)
    require_git(session_cache(), DMIDECODE_GIT, "HEAD")
    cfg = mltk_image(
        base_image, tmp_path_factory.mktemp("mltk"), {"source": {"git": MLTK_GIT}, "modules": ["system-uuid"]}
    )
    image, dev, prod = build(cfg)
    fs = Debugfs(image, tmp_path_factory.mktemp("mltk-upstream-raw"))
    yield fs, dev, prod
    os.unlink(fs.raw)


@full_matrix
def test_upstream_mltk_modules(upstream_image) -> None:
    fs, dev, prod = upstream_image
    assert dev["artifacts"]["mltk"]["modules"] == ["dmidecode", "system-uuid"]
    # system-uuid: its script (data/bin, through the image's /bin -> usr/bin) and dmidecode built from git.
    assert "dmidecode -q -s system-uuid" in fs.cat("/usr/bin/get-uuid")
    assert fs.stat("/opt/openslx/bad-uuid.d/00-default")["type"] == "regular"
    assert fs.stat("/usr/sbin/dmidecode")["mode"] == "0755"
    assert fs.stat("/bin")["type"] == "symlink"
    assert fs.stat("/usr/bin/gcc") is None and "gcc" not in prod["packages"]
