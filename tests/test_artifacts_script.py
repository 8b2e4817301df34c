"""How the artifacts go into a layer (stage4_install_artifacts/files/artifacts.sh), run here on a small
system tree with the host's tar and depmod: the prod layer's one archive, and the dev layer's kernel module
index, which the prod layer takes only for the module tree it was made for."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

from stage4.layers.prod import ARTIFACTS_SCRIPT, write_artifacts_installer
from tests.conftest import require

KERNEL = "6.1.0-0-stage4test"


def artifacts_sh(*args: object) -> str:
    argv = ["sh", ARTIFACTS_SCRIPT, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_module_index_is_reused_only_for_the_same_module_tree(tmp_path: Path) -> None:
    require("depmod", "tar")
    root, saved, brought = tmp_path / "root", tmp_path / "out/modules-index.tar", tmp_path / "brought.tar"
    modules = root / "lib/modules" / KERNEL
    modules.mkdir(parents=True)
    (modules / "modules.order").write_text("")
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    artifacts_sh("save", KERNEL, saved, root)  # the dev layer: depmod, and the index kept
    with tarfile.open(saved) as archive:
        made = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert made.pop(".stage4-tree") == b"modules.builtin 23\nmodules.order 0\n"
    assert {"modules.dep", "modules.alias.bin", "modules.builtin.bin"} <= made.keys()
    assert not (modules / ".stage4-tree").exists()

    # The prod layer, same tree: the dev layer's index replaces whatever is there; the archive is gone.
    (modules / "modules.dep").write_text("not depmod's\n")
    shutil.copy(saved, brought)
    assert artifacts_sh("restore", KERNEL, brought, root) == "module index: the dev layer's\n"
    assert {p.name: p.read_bytes() for p in modules.glob("modules.*") if p.name in made} == made
    assert not brought.exists()

    # A tree that differs (here: one more built-in module): depmod runs, and its index says so.
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/xfs/xfs.ko\n")
    shutil.copy(saved, brought)
    assert artifacts_sh("restore", KERNEL, brought, root) == "module index: depmod\n"
    assert (modules / "modules.builtin.bin").read_bytes() != made["modules.builtin.bin"]
    assert (modules / "modules.dep").read_text() == ""
    assert not brought.exists()


def test_the_prod_archive_puts_each_artifact_in_place_and_takes_the_dev_index(tmp_path: Path) -> None:
    require("depmod", "tar")
    dev, prod = tmp_path / "dev", tmp_path / "prod"
    for root in (dev, prod):
        (root / "usr/lib" / "modules" / KERNEL).mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")  # merged /usr: the archive's lib/ goes through the link
        (root / "lib/modules" / KERNEL / "modules.order").write_text("")
        (root / "usr/local").mkdir()
    (prod / "usr/local/sbin").mkdir(mode=0o700)
    built = tmp_path / "built"
    built.mkdir()
    (built / "hello.ko").write_bytes(b"not really a module")
    (built / "tool").write_text("#!/bin/sh\n")

    # The dev layer: each file in place, then depmod and its index kept.
    index = tmp_path / "out/modules-index.tar"
    extra = f"/lib/modules/{KERNEL}/extra"
    places = [
        "0644",
        built / "hello.ko",
        f"{extra}/hello.ko",
        "0755",
        built / "tool",
        "/usr/local/sbin/tool",
    ]
    artifacts_sh("place", KERNEL, index, dev, *places)
    assert (dev / extra.lstrip("/") / "hello.ko").read_bytes() == b"not really a module"
    assert oct((dev / "usr/local/sbin/tool").stat().st_mode & 0o7777) == "0o755"
    assert index.is_file()

    # The prod layer: the script with one archive (files only, root's) appended, run in a system whose
    # folders exist.
    installer = tmp_path / "artifacts.sh"
    to_install = [
        {"src": str(built / "hello.ko"), "kind": "module", "dest": f"{extra}/hello.ko", "mode": "0644"},
        {"src": str(built / "tool"), "kind": "file", "dest": "/usr/local/sbin/../sbin/tool", "mode": "0755"},
    ]
    write_artifacts_installer(to_install, index, installer)
    payload = tmp_path / "payload.tar"
    payload.write_bytes(installer.read_bytes().split(b"\n__STAGE4_ARCHIVE__\n", 1)[1])
    listing = subprocess.run(["tar", "-tvf", payload], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in listing.splitlines()] == ["-rw-r--r--", "-rwxr-xr-x", "-rw-------"]
    assert {line.split()[1] for line in listing.splitlines()} == {"root/root"}
    assert [line.split()[-1] for line in listing.splitlines()][1] == "files/usr/local/sbin/tool"
    unpack = ["sh", installer, "unpack", KERNEL, prod]
    assert subprocess.run(unpack, capture_output=True, text=True, check=True).stdout == (
        "module index: the dev layer's\n"
    )
    assert (prod / "lib").is_symlink()
    assert (prod / "usr/lib/modules" / KERNEL / "extra/hello.ko").read_bytes() == b"not really a module"
    assert oct((prod / "usr/local/sbin/tool").stat().st_mode & 0o7777) == "0o755"
    assert oct((prod / "usr/local/sbin").stat().st_mode & 0o7777) == "0o700"  # the folder's own mode
    dev_dep = (dev / "lib/modules" / KERNEL / "modules.dep").read_text()
    assert (prod / "lib/modules" / KERNEL / "modules.dep").read_text() == dev_dep == "extra/hello.ko:\n"

    # Without the dev layer's index (a dev layer made before it was kept), depmod makes it.
    write_artifacts_installer(to_install, None, installer)
    (prod / "lib/modules" / KERNEL / "modules.dep").write_text("")
    assert (
        subprocess.run(unpack, capture_output=True, text=True, check=True).stdout == "module index: depmod\n"
    )
    assert (prod / "lib/modules" / KERNEL / "modules.dep").read_text() == "extra/hello.ko:\n"
