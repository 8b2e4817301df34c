"""Desktop images: an Xfce session with LightDM in the prod layer, booted under qemu to its greeter.

One Xfce build on Debian 12 (the layered fixture image with a desktop: only its prod layer is built, in a
copy of the layered image's folder with its base and dev steps) is checked from every side: the
greeter's screenshot (a PNG qemu wrote, read back with Pillow), the base without any X or Wayland package
and the prod image with them (dpkg's status file read with debugfs), no password in prod's /etc/shadow,
graphical.target as the default. GNOME builds and boots too, and a display manager that does not start
fails the boot: in the full matrix only (one more build or boot each).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from stage4 import api
from stage4.boot import qemu, screen
from stage4.errors import StepFailed
from tests.conftest import (
    BuiltImage,
    Layered,
    full_matrix,
    layered_image_config,
    make_config,
    require,
    variant,
)
from tests.readback import Debugfs, check_screenshot, dpkg_stanza, root_offset

slow = pytest.mark.slow

NAME = "desktop-xfce"
# What the design keeps out of the base and what the Xfce session needs in prod.
GRAPHICAL = ("xserver-xorg-core", "libwayland-server0", "lightdm", "xfce4-session", "libgtk-3-0")


def build(layered: Layered, folder: Path, session: str, browser: bool = False):
    """The layered image with a desktop, in `folder`: a prod layer on the layered image's base and dev."""
    require("qemu-storage-daemon", "losetup", "debugfs")
    image = layered.image_config(extra={"desktop": {"session": session, "browser": browser}})
    cfg = variant(layered.image_dir, folder, image, ("base", "dev"))
    (result,) = api.build(cfg, [Layered.NAME])
    assert result.built == ["prod"], result.built
    return cfg, result


def boot_with_screenshot(cfg, result, shot: Path):
    """The dev run's kernel and initramfs, as prod.json names them (what export publishes)."""
    return api.boot(cfg, result.image, via="kernel", timeout=900, screenshot=shot)


@pytest.fixture(scope="module")
def xfce(layered: Layered, tmp_path_factory: pytest.TempPathFactory):
    return build(layered, tmp_path_factory.mktemp(NAME), "xfce")


@pytest.fixture(scope="module")
def greeter(xfce, tmp_path_factory: pytest.TempPathFactory):
    cfg, result = xfce
    shot = tmp_path_factory.mktemp("screen") / "greeter.png"
    return boot_with_screenshot(cfg, result, shot), shot


@slow
def test_xfce_boots_to_the_lightdm_greeter(greeter) -> None:
    booted, shot = greeter
    log = booted.serial_log.read_text(errors="replace")
    assert "STAGE4-DISPLAY-MANAGER lightdm.service active" in log
    assert f"STAGE4-USERSPACE-UP {booted.marker}" in log
    assert booted.display_manager == "lightdm.service"
    check_screenshot(shot)


@slow
def test_base_has_no_graphical_package_and_prod_has_the_session(
    xfce, base_image: BuiltImage, tmp_path: Path
) -> None:
    _, result = xfce
    base_status = Debugfs(base_image.path, tmp_path).cat("/var/lib/dpkg/status")
    prod_status = Debugfs(result.image, tmp_path).cat("/var/lib/dpkg/status")
    assert "Package: base-files" in base_status  # the file was read
    for package in GRAPHICAL:
        assert dpkg_stanza(base_status, package) == {}, package
        assert dpkg_stanza(prod_status, package).get("Status") == "install ok installed", package
    # No recommends: the full GNOME or a browser did not come along.
    for package in ("gnome-shell", "firefox-esr", "xfce4-goodies"):
        assert dpkg_stanza(prod_status, package) == {}, package


@slow
def test_prod_boots_graphical_without_accounts_or_passwords(xfce, tmp_path: Path) -> None:
    _, result = xfce
    fs = Debugfs(result.image, tmp_path)
    default = fs.run("stat /etc/systemd/system/default.target")
    assert "graphical.target" in default, default
    assert "lightdm.service" in fs.run("stat /etc/systemd/system/display-manager.service")
    assert fs.cat("/etc/X11/default-display-manager").strip() == "/usr/sbin/lightdm"
    for line in fs.cat("/etc/shadow").splitlines():
        user, password = line.split(":")[:2]
        assert password in ("*", "!*", "!"), user  # no password login for anyone
    humans = [line for line in fs.cat("/etc/passwd").splitlines() if 1000 <= int(line.split(":")[2]) < 60000]
    assert humans == []


@slow
@full_matrix
def test_a_display_manager_that_does_not_start_fails_the_boot(
    xfce, base_image: BuiltImage, tmp_path: Path
) -> None:
    """The same image without LightDM's program: its unit cannot start (systemd gives up after its
    restarts), and the boot fails in one line. (Debian's lightdm.service, unlike gdm3's, does not check
    /etc/X11/default-display-manager: naming another display manager there does not stop it.)"""
    cfg, result = xfce
    broken = tmp_path / "broken.raw"
    target = f"{broken}?offset={root_offset(result.image, broken)}"  # converts the image to raw first
    subprocess.run(["debugfs", "-w", "-R", "rm /usr/sbin/lightdm", target], check=True, capture_output=True)
    listing = subprocess.run(
        ["debugfs", "-R", "ls /usr/sbin", target], check=True, capture_output=True, text=True
    )
    assert "lightdm" not in listing.stdout.split()
    kernel = base_image.manifest["kernel_versions"][-1]
    with pytest.raises(StepFailed, match=r"the display manager did not start: lightdm.service is \w+"):
        api.boot(
            cfg,
            broken,
            via="kernel",
            kernel=result.artifacts_dir / f"vmlinuz-{kernel}",
            initrd=result.artifacts_dir / f"initrd.img-{kernel}",
            identifier="SLX_SYS",
            timeout=900,
            screenshot=tmp_path / "none.png",
        )
    assert not (tmp_path / "none.png").exists()


def test_what_counts_as_a_drawn_screen(tmp_path: Path) -> None:
    """Both greeters of docs/images count as drawn; a patch of text on a flat screen (GDM's username box
    alone: 149 colours on 0.07 % of it, about what a mouse pointer covers) does not (fast)."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "images"
    for name in ("gnome-gdm.png", "xfce-lightdm.png"):
        assert screen.drawn(screen.colours(docs / name)), name
    with Image.open(docs / "gnome-gdm.png") as png:
        gdm = png.convert("RGB")
    picture = Image.new("RGB", gdm.size, gdm.getpixel((5, 300)))
    picture.paste(gdm.crop((340, 400, 640, 450)), (340, 400))
    picture.save(tmp_path / "patch.png")
    found = screen.colours(tmp_path / "patch.png")
    assert found[0] >= screen.MIN_COLOURS and not screen.drawn(found)


def test_display_manager_lines() -> None:
    """What the boot makes of the display manager's report (fast; the full matrix boots a broken image)."""
    spec = qemu.BootSpec(None, "tcg", 1, 512, Path("serial.log"))
    assert (
        qemu.check_display_manager(["x", "STAGE4-DISPLAY-MANAGER gdm.service active"], spec) == "gdm.service"
    )
    assert qemu.check_display_manager(["no report"], spec) is None
    with pytest.raises(StepFailed, match="gdm.service is failed"):
        qemu.check_display_manager(["STAGE4-DISPLAY-MANAGER gdm.service failed"], spec)
    spec.screenshot = Path("shot.png")
    with pytest.raises(StepFailed, match="a screenshot needs a desktop image"):
        qemu.check_display_manager(["no report"], spec)


@slow
@full_matrix
def test_gnome_with_a_browser_boots_to_the_gdm_greeter(layered: Layered, tmp_path: Path) -> None:
    cfg, result = build(layered, tmp_path / "gnome", "gnome", browser=True)
    status = Debugfs(result.image, tmp_path).cat("/var/lib/dpkg/status")
    for package in ("gdm3", "gnome-shell", "firefox-esr"):
        assert dpkg_stanza(status, package).get("Status") == "install ok installed", package
    assert dpkg_stanza(status, "lightdm") == {}
    booted = boot_with_screenshot(cfg, result, tmp_path / "gdm.png")
    assert booted.display_manager == "gdm.service"
    check_screenshot(tmp_path / "gdm.png")


@slow
@full_matrix
def test_xfce_on_debian_13_boots_to_the_lightdm_greeter(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Debian 13: a base of its own, the same role and package set."""
    work = tmp_path_factory.mktemp("trixie")
    image = layered_image_config(project, extra={"distribution": "debian-13", "desktop": {"session": "xfce"}})
    cfg = make_config(work, {"desktop-xfce-13": image})
    (result,) = api.build(cfg, ["desktop-xfce-13"])
    assert result.base.manifest["inputs"]["distribution"] == "debian-13"
    booted = boot_with_screenshot(cfg, result, work / "greeter.png")
    assert booted.display_manager == "lightdm.service"
    check_screenshot(work / "greeter.png")
