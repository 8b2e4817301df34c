"""mltk modules built in dev and installed in prod, on the real Debian 12 base.

One image from the fixture tree (tests/fixtures/mltk: stage4-greeter requires stage4-hello, which compiles
a C program; the greeter has data/ with a systemd unit and a content package), checked in the flattened
prod image with debugfs on a raw copy (a tool stage4 did not write). Where a checkout of the public mltk
is available, a second image runs its haveged, zram-swap and system-uuid modules.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from stage4 import api
from stage4.errors import ConfigError
from tests.conftest import FIXTURES, BuiltImage, full_matrix, session_cache, variant
from tests.readback import Debugfs, dpkg_stanza
from tests.upstream import require_git

FIXTURE = FIXTURES / "mltk"
MLTK_GIT = "https://github.com/bwLehrpool/mltk.git"
DMIDECODE_GIT = "https://git.savannah.nongnu.org/git/dmidecode.git"  # system-uuid -> dmidecode's REQUIRED_GIT
NAME = "debian-12"
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


def link_target(fs: Debugfs, path: str) -> str:
    out = fs.run(f"stat {path}")
    return out.split('Fast link dest: "', 1)[1].split('"', 1)[0]


@pytest.fixture(scope="module")
def fixture_image(base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("mltk")
    image, dev, prod = build(
        mltk_image(base_image, folder, {"source": {"path": str(FIXTURE)}, "modules": ["stage4-greeter"]})
    )
    fs = Debugfs(image, tmp_path_factory.mktemp("mltk-raw"))
    yield fs, dev, prod
    os.unlink(fs.raw)


def test_fixture_modules_land_in_prod(fixture_image) -> None:
    fs, dev, prod = fixture_image
    mltk = dev["artifacts"]["mltk"]
    assert mltk["modules"] == ["stage4-hello", "stage4-greeter"]  # the dependency first
    assert mltk["content_packages"] == ["tree"]
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
    modules = ["haveged", "zram-swap", "system-uuid"]
    cfg = mltk_image(
        base_image, tmp_path_factory.mktemp("mltk"), {"source": {"git": MLTK_GIT}, "modules": modules}
    )
    image, dev, prod = build(cfg)
    fs = Debugfs(image, tmp_path_factory.mktemp("mltk-upstream-raw"))
    yield fs, dev, prod
    os.unlink(fs.raw)


@full_matrix
def test_upstream_mltk_modules(upstream_image) -> None:
    fs, dev, prod = upstream_image
    assert dev["artifacts"]["mltk"]["modules"] == ["haveged", "zram-swap", "dmidecode", "system-uuid"]
    # haveged: its content package installed as a package, its unit and enabling link from data/.
    assert fs.stat("/usr/sbin/haveged")["type"] == "regular"
    assert "haveged" in prod["packages"]
    assert "ExecStart=/usr/sbin/haveged" in fs.cat("/etc/systemd/system/haveged.service")
    link = "/etc/systemd/system/default.target.wants/haveged.service"
    assert link_target(fs, link) == "../haveged.service"
    # zram-swap: unit, enabling link and its script.
    assert "ExecStart=/opt/openslx/scripts/systemd-zram_swap" in fs.cat(
        "/etc/systemd/system/zram-swap.service"
    )
    assert (
        link_target(fs, "/etc/systemd/system/sysinit.target.wants/zram-swap.service")
        == "../zram-swap.service"
    )
    assert fs.stat("/opt/openslx/scripts/systemd-zram_swap")["type"] == "regular"
    # system-uuid: its script (data/bin, through the image's /bin -> usr/bin) and dmidecode built from git.
    assert "dmidecode -q -s system-uuid" in fs.cat("/usr/bin/get-uuid")
    assert fs.stat("/opt/openslx/bad-uuid.d/00-default")["type"] == "regular"
    assert fs.stat("/usr/sbin/dmidecode")["mode"] == "0755"
    assert fs.stat("/bin")["type"] == "symlink"
    assert fs.stat("/usr/bin/gcc") is None and "gcc" not in prod["packages"]
