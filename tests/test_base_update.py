"""Issue 19: a base whose only change is its package list is made from the kept root tree of the previous
build of that image (builders/base_image.py: keep_tree, claim_kept_tree; bootstrap.update_tree), and equals
a bootstrap from scratch."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.builders import base_image, bootstrap
from stage4.context import Context
from stage4.runner import Runner
from tests.conftest import BuiltImage, full_matrix, make_config, run_dir, session_cache

# What may differ between the updated tree and a bootstrap from scratch: state that records how the tree
# came to be (dpkg's and debconf's backups of their databases), never what is installed.
ALLOWED_FILE_DIFFERENCES = {
    "/var/lib/dpkg/status-old",
    "/var/lib/dpkg/diversions-old",
    "/var/cache/debconf/config.dat-old",
    "/var/cache/debconf/templates.dat-old",
}


def _context(tmp: Path, image: dict, rebuild: frozenset[str] = frozenset()) -> Context:
    cfg = config.from_dict(
        {"build": {"output_dir": str(tmp / "out"), "cache_dir": str(tmp / "cache")}, "images": {"x": image}},
        str(tmp / "stage4.toml"),
    )
    return Context("x", cfg.images["x"], cfg.machine, "t", tmp / "out", tmp / "cache", Runner(), rebuild)


def test_the_kept_tree_key_ignores_the_package_list_only(tmp_path: Path) -> None:
    plain = base_image.bootstrap_plan(_context(tmp_path, {"distribution": "debian-12"}))
    plus = base_image.bootstrap_plan(_context(tmp_path, {"distribution": "debian-12", "packages": ["tree"]}))
    assert plain.packages() != plus.packages()
    assert base_image.tree_key(plain) == base_image.tree_key(plus)
    for other in (
        {"distribution": "debian-12", "filesystem": "xfs"},  # fstab
        {"distribution": "debian-12", "identifier": "system"},  # fstab
        {"distribution": "debian-12", "mirror": "http://example.org/debian"},  # sources
        {"distribution": "ubuntu-24.04"},
    ):
        changed = base_image.bootstrap_plan(_context(tmp_path, other))
        assert base_image.tree_key(changed) != base_image.tree_key(plain), other


def _keep(ctx: Context, packages: list[str]) -> None:
    rootfs = ctx.cache_dir / "some-rootfs"
    (rootfs / "etc").mkdir(parents=True)
    plan = base_image.bootstrap_plan(ctx)
    base_image.keep_tree(ctx, plan, rootfs, "a" * 64)
    record = next((ctx.cache_dir / "trees").glob("x-*/tree.json"))
    json.loads(record.read_text())  # written whole
    record.write_text(json.dumps({"base": "a" * 64, "packages": packages}))


class _Took(Exception):
    pass


def _path_taken(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str] | None]:
    seen: list[tuple[str, list[str] | None]] = []

    def scratch(*_args: object) -> None:
        seen.append(("scratch", None))
        raise _Took("path taken")

    def update(plan, rootfs, work, cache_dir, runner, previous) -> None:
        assert rootfs.is_dir() and (rootfs / "etc").is_dir()  # the kept tree, moved into the work dir
        seen.append(("update", previous))
        raise _Took("path taken")

    monkeypatch.setattr(bootstrap, "run_mmdebstrap", scratch)
    monkeypatch.setattr(bootstrap, "update_tree", update)
    work = ctx.cache_dir / "work" / "x-0123456789abcdef"
    work.mkdir(parents=True, exist_ok=True)
    with pytest.raises(_Took, match="path taken"):
        base_image._bootstrap_base(ctx, "b" * 64, work, {})
    return seen[0]


def test_a_new_package_list_updates_the_kept_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _keep(_context(tmp_path, {"distribution": "debian-12"}), ["apt", "less"])
    ctx = _context(tmp_path, {"distribution": "debian-12", "packages": ["tree"]})
    assert _path_taken(ctx, monkeypatch) == ("update", ["apt", "less"])
    # claimed: a second build (say, after a failure) has no kept tree and bootstraps from scratch
    assert not list((tmp_path / "cache" / "trees").glob("x-*/tree.json"))
    assert _path_taken(ctx, monkeypatch)[0] == "scratch"


def test_rebuild_base_bootstraps_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _keep(_context(tmp_path, {"distribution": "debian-12"}), ["apt"])
    ctx = _context(tmp_path, {"distribution": "debian-12", "packages": ["tree"]}, frozenset({"base"}))
    assert _path_taken(ctx, monkeypatch)[0] == "scratch"
    assert list((tmp_path / "cache" / "trees").glob("x-*/tree.json"))  # left for a later build


def test_a_file_mirror_bootstraps_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = {"distribution": "debian-12", "mirror": f"file://{tmp_path}/mirror"}
    _keep(_context(tmp_path, image), ["apt"])
    ctx = _context(tmp_path, {**image, "packages": ["tree"]})
    assert _path_taken(ctx, monkeypatch)[0] == "scratch"


def test_another_tree_key_bootstraps_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _keep(_context(tmp_path, {"distribution": "debian-12"}), ["apt"])
    ctx = _context(tmp_path, {"distribution": "debian-12", "identifier": "system"})
    assert _path_taken(ctx, monkeypatch)[0] == "scratch"


def test_removed_packages_go_with_what_only_they_pulled_in() -> None:
    script = bootstrap.update_script(["tree"], ["less", "vim-tiny"])
    assert "apt-mark auto less vim-tiny" in script  # a package others still need stays, marked auto
    assert "apt install tree" in script
    assert "autoremove --purge" in script
    assert "upgrade | grep -q '^Inst '; then exit 75" in script  # the mirror moved on: from scratch
    assert "purge less" not in script  # a purge by name would take its reverse dependencies along
    # no trace of the build host left behind
    assert script.index("policy-rc.d") < script.index("apt update")
    assert 'rm -f "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"' in script


def _copy_cache(source: Path, target: Path) -> str:
    """The session cache's kept tree of debian-12 (not debian-12-xfs's), packages and initramfs images, for
    a cache of this test's own; the identity of the base the tree was kept from (the fixture's, unless
    another test of the session built debian-12 with another package list since)."""
    (target / "trees").mkdir(parents=True)
    (kept,) = (source / "trees").glob("debian-12-" + "[0-9a-f]" * 16)
    subprocess.run(["cp", "-a", "--reflink=auto", str(kept), str(target / "trees")], check=True)
    subprocess.run(["cp", "-al", str(source / "apt"), str(target)], check=True)
    subprocess.run(["cp", "-a", str(source / "initramfs"), str(target)], check=True)
    return json.loads((kept / "tree.json").read_text())["base"]


def _unexpected(found: dict) -> dict:
    files = found["files"]
    return {
        "added": [p for p in files["added"] if p not in ALLOWED_FILE_DIFFERENCES],
        "removed": [p for p in files["removed"] if p not in ALLOWED_FILE_DIFFERENCES],
        "changed": {p: k for p, k in files["changed"].items() if p not in ALLOWED_FILE_DIFFERENCES},
    }


NO_DIFFERENCE = {"added": [], "removed": [], "changed": {}}


def _update(folder: Path, cache: Path, packages: list[str], previous: str) -> tuple[config.Config, dict]:
    cfg = make_config(folder, {"debian-12": {"distribution": "debian-12", "packages": packages}}, cache)
    (built,) = api.build(cfg, ["debian-12"])
    manifest = json.loads((built.image.parent / "base.json").read_text())
    assert manifest["from"] == previous  # the fast path was taken
    assert "update" in manifest["timings_seconds"] and "bootstrap" not in manifest["timings_seconds"]
    report = api.inspect(built.image)
    assert report.passed, report.problems()
    return cfg, manifest


def test_bootstrap_hooks_link_the_package_cache_in_and_out(tmp_path: Path) -> None:
    """mmdebstrap's hooks: the cache's packages hard-linked into the new root and the root's new ones back
    (copies across filesystems); no lock file, nothing of the cache overwritten."""
    cache, root = tmp_path / "apt cache", tmp_path / "root"
    archives = root / "var/cache/apt/archives"
    archives.mkdir(parents=True)
    cache.mkdir()
    (cache / "a_1_amd64.deb").write_text("a")
    (cache / "lock").write_text("")

    def hook(source: str, target: str) -> None:
        command = bootstrap.link_debs(source, target)
        subprocess.run(["sh", "-c", command, "exec", str(root)], check=True)

    cached = shlex.quote(str(cache))
    hook(cached, bootstrap.IN_ROOT_ARCHIVES)
    assert sorted(p.name for p in archives.iterdir()) == ["a_1_amd64.deb"]
    assert (archives / "a_1_amd64.deb").stat().st_ino == (cache / "a_1_amd64.deb").stat().st_ino
    (archives / "b_1_amd64.deb").write_text("b")  # downloaded by apt in the root
    hook(bootstrap.IN_ROOT_ARCHIVES, cached)
    assert sorted(p.name for p in cache.iterdir()) == ["a_1_amd64.deb", "b_1_amd64.deb", "lock"]
    assert (cache / "b_1_amd64.deb").stat().st_ino == (archives / "b_1_amd64.deb").stat().st_ino
    other = Path("/dev/shm")
    if other.is_dir() and other.stat().st_dev != tmp_path.stat().st_dev:
        elsewhere = Path(tempfile.mkdtemp(dir=other))
        try:
            hook(cached, shlex.quote(str(elsewhere)))
            assert sorted(p.read_text() for p in elsewhere.iterdir()) == ["a", "b"]
        finally:
            shutil.rmtree(elsewhere)


@pytest.mark.slow
def test_one_more_package_then_one_less_updates_the_kept_tree(
    base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """CI's check: +tree from the fixture's kept tree, then -tree again, which must equal the fixture's
    base (a bootstrap from scratch) file by file: the removal takes what only `tree` pulled in along."""
    folder = run_dir(tmp_path_factory, "plus-minus-one")
    cache = folder / "cache"
    kept_from = _copy_cache(session_cache(), cache)
    _, plus = _update(folder, cache, ["tree"], kept_from)
    assert plus["packages"] == {**base_image.manifest["packages"], "tree": plus["packages"]["tree"]}
    cfg, back = _update(folder, cache, [], plus["identity"])
    assert back["identity"] == base_image.manifest["identity"]  # the identity is that of the inputs
    found = api.diff(base_image.path, folder / "output" / "debian-12" / "base.qcow2", files=True)
    assert found.get("packages") in (None, {"added": {}, "removed": {}, "changed": {}}), found.get("packages")
    print(f"allowed differences: {found['files']}")
    assert _unexpected(found) == NO_DIFFERENCE


@full_matrix
@pytest.mark.slow
def test_one_more_package_equals_a_bootstrap_from_scratch(
    base_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """+tree from the kept tree against +tree bootstrapped from scratch (`--rebuild base`)."""
    folder = run_dir(tmp_path_factory, "plus-one")
    cache = folder / "cache"
    kept_from = _copy_cache(session_cache(), cache)
    cfg, manifest = _update(folder, cache, ["tree"], kept_from)
    assert "tree" in manifest["packages"]
    shutil.copytree(folder / "output" / "debian-12", folder / "updated")  # the rebuild below replaces it
    (fresh,) = api.build(cfg, ["debian-12"], rebuild={"base"})
    fresh_manifest = json.loads((fresh.image.parent / "base.json").read_text())
    assert "from" not in fresh_manifest and "bootstrap" in fresh_manifest["timings_seconds"]
    assert fresh_manifest["identity"] == manifest["identity"]  # the identity is that of the inputs
    found = api.diff(folder / "updated" / "base.json", fresh.image.parent / "base.json", files=True)
    assert found.get("packages") in (None, {"added": {}, "removed": {}, "changed": {}}), found.get("packages")
    print(f"allowed differences: {found['files']}")
    assert _unexpected(found) == NO_DIFFERENCE
