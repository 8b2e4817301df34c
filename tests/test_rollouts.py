"""Safe rollouts on real layered builds: the kernel coupling guard, nothing of the build host in the images,
and `stage4 diff` between two builds.

The run's layered fixture image (conftest's `layered`: a fixture component with a kernel module, a
fixture dracut module) is checked; builds that change it run in copies of its folder. What the images
hold is read back with debugfs and dpkg's own status file, not with stage4's readers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from stage4 import api
from stage4.errors import StepFailed
from stage4.fsutil import sha256_file
from tests.conftest import (
    STAGE4,
    BuiltImage,
    Layered,
    full_matrix,
    layered_image_config,
    require,
    variant,
)
from tests.readback import Debugfs, dpkg_stanza

NAME = Layered.NAME

pytestmark = pytest.mark.slow


def test_base_and_prod_carry_nothing_of_the_build_host(
    layered: Layered, base_image: BuiltImage, tmp_path: Path
) -> None:
    require("debugfs")
    result = layered.result
    host_name = socket.gethostname()
    for image in (base_image.path, result.image):
        fs = Debugfs(image, tmp_path)
        # systemd-resolved's own link: its stub gets the resolver from DHCP when the image boots.
        assert fs.stat("/etc/resolv.conf")["type"] == "symlink", image
        assert "../run/systemd/resolve/stub-resolv.conf" in fs.run("stat /etc/resolv.conf"), image
        assert not [name for name in fs.names("/etc") if name.startswith(".resolv.conf")], image
        hostname, hosts = fs.cat("/etc/hostname"), fs.cat("/etc/hosts")
        assert hostname.strip() == NAME and host_name != NAME, hostname
        assert host_name not in hostname.split() and host_name not in hosts.split(), (image, hosts)
        for conf in fs.names("/etc/apt/apt.conf.d"):
            text = fs.cat(f"/etc/apt/apt.conf.d/{conf}").lower()
            for setting in ("proxy", "dir::cache", "keep-downloaded-packages"):
                assert setting not in text, (image, conf, text)
        assert fs.stat("/usr/sbin/policy-rc.d") is None, image
        os.unlink(fs.raw)


def test_prod_holds_the_kernel_and_records_the_hold(
    layered: Layered, base_image: BuiltImage, tmp_path: Path
) -> None:
    result = layered.result
    kernel = result.dev_manifest["kernel_version"]
    fs = Debugfs(result.image, tmp_path)
    status = fs.cat("/var/lib/dpkg/status")
    for package in (f"linux-image-{kernel}", "linux-image-amd64"):
        assert dpkg_stanza(status, package).get("Status") == "hold ok installed", package
    held = sorted(
        fields["Package"]
        for fields in (
            dict(
                line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace()
            )
            for stanza in status.split("\n\n")
        )
        if fields.get("Status", "").startswith("hold ")
    )
    manifest = json.loads((result.image.parent / "prod.json").read_text())
    assert manifest["kernel_hold"] == {"method": "apt-mark hold", "packages": held}
    assert f"linux-image-{kernel}" in manifest["packages"]  # a held package is still installed
    # The base is not held: only prod is.
    base_status = Debugfs(base_image.path, tmp_path).cat("/var/lib/dpkg/status")
    assert dpkg_stanza(base_status, f"linux-image-{kernel}").get("Status") == "install ok installed"


def test_inspect_reports_whether_modules_and_initramfs_belong_to_the_kernel(layered: Layered) -> None:
    result = layered.result
    kernel = result.dev_manifest["kernel_version"]
    report = api.inspect(result.image)
    assert report.passed, report.problems()
    (facts,) = report.to_dict()["kernels"]
    assert facts == {
        "version": kernel,
        "initramfs": f"initrd.img-{kernel}",
        "modules_tree": True,
        "extra_modules": {"stage4hello.ko": kernel},
        "initramfs_kernels": [kernel],
        "belongs": True,
    }
    out = subprocess.run([STAGE4, "inspect", str(result.image)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"kernel {kernel}: modules tree yes, extra modules stage4hello.ko ({kernel})" in out.stdout


@full_matrix
def test_diff_of_two_builds_shows_the_package_and_the_file(
    layered: Layered,
    project: Path,
    tmp_path: Path,
) -> None:
    first = layered.result
    kept = tmp_path / "first"
    kept.mkdir()
    for name in ("base.json", "dev.json", "prod.json", "prod.qcow2"):
        shutil.copy2(first.image.parent / name, kept / name)
    changed = layered_image_config(project, prod_text="prod v2")
    changed["prod"]["packages"] = ["tree"]
    cfg = variant(layered.image_dir, tmp_path / "copy", changed, ("base", "dev", "prod"))
    (second,) = api.build(cfg, [NAME])
    assert second.built == ["prod"]

    out = subprocess.run(
        [STAGE4, "diff", "--json", "--files", str(kept / "prod.qcow2"), str(second.image)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["packages"]["removed"] == {} and found["packages"]["changed"] == {}
    assert list(found["packages"]["added"]) == ["tree"]
    assert found["kernel"]["a"] == found["kernel"]["b"] and not found["kernel"]["changed"]
    assert found["identities"]["prod"]["a"] != found["identities"]["prod"]["b"]
    assert found["identities"]["dev"]["a"] == found["identities"]["dev"]["b"]
    files = found["files"]
    assert "/etc/stage4-fixture" in files["changed"]
    assert "/usr/bin/tree" in files["added"]
    assert not files["removed"], files["removed"]
    # Every other added file is tree's own or dpkg's record of it.
    tree_files = set(Debugfs(second.image, tmp_path).cat("/var/lib/dpkg/info/tree.list").split())
    assert {f for f in files["added"] if not f.startswith("/var/lib/dpkg/info/tree.")} <= tree_files

    text = subprocess.run(
        [STAGE4, "diff", str(kept / "prod.qcow2"), str(second.image)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert text.returncode == 0, text.stderr
    assert "+ tree " in text.stdout, text.stdout


def test_a_prod_playbook_that_installs_another_kernel_fails_naming_both(
    layered: Layered, project: Path, tmp_path: Path
) -> None:
    kernel = layered.result.dev_manifest["kernel_version"]
    playbook = tmp_path / "kernel.yml"
    # Another flavour of the same kernel release: in the mirror, and not held.
    playbook.write_text(
        "- hosts: all\n  tasks:\n    - name: Install another kernel\n"
        "      ansible.builtin.apt:\n"
        "        name: \"linux-image-{{ stage4_kernel_version | replace('-amd64', '-cloud-amd64') }}\"\n"
    )
    image = {**layered_image_config(project), "prod": {"playbooks": [str(playbook)]}}
    cfg = variant(layered.image_dir, tmp_path / "copy", image, ("base", "dev", "prod"))
    prod = cfg.build.output_dir / NAME / "prod.qcow2"
    before = sha256_file(prod)
    other = kernel.replace("-amd64", "-cloud-amd64")
    expected = (
        "^"
        + re.escape(
            f"{NAME}: prod: kernel and package list failed: the prod layer changed the kernel: the dev run "
            f"built the initramfs and modules for {kernel}, prod has "
        )
        + ".*"
        + re.escape(other)
    )
    with pytest.raises(StepFailed, match=expected) as caught:
        api.build(cfg, [NAME])
    message = str(caught.value)
    assert "\n" not in message and kernel in message and other in message, message
    assert "prod" in message and "changed the kernel" in message, message
    print(message)
    assert sha256_file(prod) == before
