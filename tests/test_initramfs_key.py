"""When may a bootstrap reuse a cached initramfs? Only when nothing it is made of changed."""

from __future__ import annotations

from pathlib import Path

from stage4.builders.initramfs import LISTING_LINE, key_for

KERNEL = "6.1.0-56-amd64"


class Tree:
    """A root file system with a dpkg database, just big enough to answer the question."""

    def __init__(self, root: Path):
        self.root = root
        self.packages: dict[str, tuple[str, list[str]]] = {}
        (root / "var/lib/dpkg/info").mkdir(parents=True)

    def install(self, package: str, version: str, files: dict[str, str]) -> None:
        for path, content in files.items():
            full = self.root / path.lstrip("/")
            full.parent.mkdir(parents=True, exist_ok=True)
            full.write_text(content)
        directories = {str(Path(p).parent) for p in files}
        self.packages[package] = (version, ["/.", *sorted(directories), *files])
        self._write()

    def _write(self) -> None:
        stanzas = [
            f"Package: {name}\nStatus: install ok installed\nVersion: {version}\n"
            for name, (version, _) in sorted(self.packages.items())
        ]
        (self.root / "var/lib/dpkg/status").write_text("\n".join(stanzas))
        for name, (_, files) in self.packages.items():
            (self.root / f"var/lib/dpkg/info/{name}.list").write_text("\n".join(files) + "\n")


def make_tree(tmp_path: Path) -> tuple[Tree, list[str]]:
    tree = Tree(tmp_path / "root")
    tree.install(
        "systemd", "252.39", {"/usr/lib/systemd/systemd": "elf", "/usr/lib/systemd/system/a.service": "x"}
    )
    tree.install("udev", "252.39", {"/usr/lib/udev/rules.d/50-udev-default.rules": "rules"})
    tree.install("dracut-core", "059-4", {"/usr/lib/dracut/modules.d/99base/init.sh": "#!/bin/sh"})
    tree.install("tree", "2.1.0-1", {"/usr/bin/tree": "elf"})
    (tree.root / "etc").mkdir(exist_ok=True)
    (tree.root / "etc/fstab").write_text("PARTLABEL=SLX_SYS / ext4 defaults 0 1\n")
    contents = ["usr", "usr/lib", "usr/lib/systemd/systemd", "etc/fstab", "init"]
    return tree, contents


def test_a_package_outside_the_initramfs_keeps_the_key(tmp_path: Path) -> None:
    tree, contents = make_tree(tmp_path)
    before, _ = key_for(tree.root, KERNEL, contents)
    tree.install("nano", "7.2-1", {"/usr/bin/nano": "elf", "/usr/share/doc/nano/copyright": "GPL"})
    tree.install("tree", "2.1.1-1", {"/usr/bin/tree": "newer elf"})
    assert key_for(tree.root, KERNEL, contents)[0] == before


def test_a_changed_package_inside_the_initramfs_changes_the_key(tmp_path: Path) -> None:
    tree, contents = make_tree(tmp_path)
    before, inputs = key_for(tree.root, KERNEL, contents)
    assert inputs["packages"] == {"systemd": "252.39", "udev": "252.39", "dracut-core": "059-4"}
    tree.install("systemd", "252.40", {"/usr/lib/systemd/systemd": "elf 2"})
    assert key_for(tree.root, KERNEL, contents)[0] != before


def test_new_files_where_dracut_looks_change_the_key(tmp_path: Path) -> None:
    tree, contents = make_tree(tmp_path)
    before, _ = key_for(tree.root, KERNEL, contents)
    tree.install("multipath-tools", "0.9.4", {"/usr/lib/udev/rules.d/56-multipath.rules": "rules"})
    with_rule, _ = key_for(tree.root, KERNEL, contents)
    assert with_rule != before
    tree.install("dnbd3-dracut", "1", {"/usr/lib/dracut/modules.d/90dnbd3-rootfs/module-setup.sh": "x"})
    assert key_for(tree.root, KERNEL, contents)[0] != with_rule


def test_unpackaged_files_count_by_content(tmp_path: Path) -> None:
    tree, contents = make_tree(tmp_path)
    before, inputs = key_for(tree.root, KERNEL, contents)
    assert set(inputs["unowned"]) == {"/etc/fstab"}
    (tree.root / "etc/fstab").write_text("PARTLABEL=system / xfs defaults 0 0\n")
    assert key_for(tree.root, KERNEL, contents)[0] != before
    assert key_for(tree.root, "6.1.0-57-amd64", contents)[0] != key_for(tree.root, KERNEL, contents)[0]


def test_lsinitrd_listing_lines() -> None:
    lines = {
        "crw-r--r--   1 root     root       5,   1 Nov 25 21:57 dev/console": "dev/console",
        "-rwxr-xr-x   1 root     root       203152 Sep 20  2022 usr/bin/less": "usr/bin/less",
        "lrwxrwxrwx   1 root     root            7 Nov 25 21:57 bin -> usr/bin": "bin -> usr/bin",
        "Image: /boot/initrd.img-6.1.0-56-amd64: 38M": None,
        "========================================================================": None,
    }
    for line, path in lines.items():
        match = LISTING_LINE.match(line)
        assert (match.group(1) if match else None) == path
