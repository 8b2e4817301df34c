"""The prod layer takes the dev layer's kernel module index only for the module tree it was made for
(stage4_install_artifacts/files/module-index.sh), run here on a small module tree with the host's depmod."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

from stage4.provisioning.ansible import ROLES_DIR
from tests.conftest import require

SCRIPT = ROLES_DIR / "stage4_install_artifacts/files/module-index.sh"
KERNEL = "6.1.0-0-stage4test"


def module_index(*args: object) -> str:
    return subprocess.run(["sh", SCRIPT, *map(str, args)], capture_output=True, text=True, check=True).stdout


def test_module_index_is_reused_only_for_the_same_module_tree(tmp_path: Path) -> None:
    require("depmod", "tar")
    root, saved, brought = tmp_path / "root", tmp_path / "out/modules-index.tar", tmp_path / "brought.tar"
    modules = root / "lib/modules" / KERNEL
    modules.mkdir(parents=True)
    (modules / "modules.order").write_text("")
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    module_index("save", KERNEL, saved, root)  # the dev layer: depmod, and the index kept
    with tarfile.open(saved) as archive:
        made = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert made.pop(".stage4-tree") == b"modules.builtin 23\nmodules.order 0\n"
    assert {"modules.dep", "modules.alias.bin", "modules.builtin.bin"} <= made.keys()
    assert not (modules / ".stage4-tree").exists()

    # The prod layer, same tree: the dev layer's index replaces whatever is there; the archive is gone.
    (modules / "modules.dep").write_text("not depmod's\n")
    shutil.copy(saved, brought)
    assert module_index("restore", KERNEL, brought, root) == "module index: the dev layer's\n"
    assert {p.name: p.read_bytes() for p in modules.glob("modules.*") if p.name in made} == made
    assert not brought.exists()

    # A tree that differs (here: one more built-in module): depmod runs, and its index says so.
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/xfs/xfs.ko\n")
    shutil.copy(saved, brought)
    assert module_index("restore", KERNEL, brought, root) == "module index: depmod\n"
    assert (modules / "modules.builtin.bin").read_bytes() != made["modules.builtin.bin"]
    assert (modules / "modules.dep").read_text() == ""
    assert not brought.exists()
