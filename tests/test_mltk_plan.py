"""mltk targets and `stage4 mltk plan`, the fast part: target expansion (sub-targets, the target's own module
variants), the SYS_* variables, each reason a module is not ready, the command's output and exit codes,
and the build refusing such a module before its dev layer. With the public mltk from stage4's source
cache: the plan of bwLehrpool's `stage4` target on Debian 12 and 13."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.context import Context
from stage4.errors import ConfigError, InputError
from stage4.layers import dev
from stage4.mltk import modules
from stage4.mltk.packages import PackageIndex
from stage4.mltk.targets import sys_variables
from stage4.provisioning.source_cache import SourceCache
from stage4.runner import Runner
from tests.upstream import require_git

FIXTURE = Path(__file__).parent / "fixtures/mltk"
MLTK_GIT = "https://github.com/bwLehrpool/mltk.git"
DEBIAN12 = modules.sys_versions("debian-12")


def order(tree: Path, names: list[str], distro: str = "debian-12") -> list[modules.Module]:
    versions = modules.sys_versions(distro)
    return modules.ordered(tree, names, versions, Runner(), "t", sys_variables(distro, versions))


def test_target_expands_with_sub_targets_and_its_own_variants() -> None:
    # fixture-top links a-first, the sub-target fixture-sub (stage4-greeter, and stage4-hello as the
    # variant stage4-hello-variant) and z-last (core/modules/stage4-hello under another name); its README
    # is no link and does not count. stage4-greeter requires stage4-hello: inside the target, the variant.
    found = [(m.name, m.path) for m in order(FIXTURE, ["fixture-top"])]
    assert found == [
        ("a-first", "core/modules/stage4-base-tool"),
        ("stage4-hello", "core/modules/stage4-hello-variant"),
        ("stage4-greeter", "core/modules/stage4-greeter"),
        ("z-last", "core/modules/stage4-hello"),
    ]
    # A module named beside the target is the target's variant too; alone, it is core/modules' own.
    assert [m.path for m in order(FIXTURE, ["fixture-top", "stage4-hello"])] == [p for _, p in found]
    assert [m.path for m in order(FIXTURE, ["stage4-hello"])] == ["core/modules/stage4-hello"]
    # The stage4 target of the fixture (links only) expands as well.
    assert [m.name for m in order(FIXTURE, ["stage4"])] == ["stage4-hello", "stage4-greeter"]


def test_target_problems_name_the_links(tmp_path: Path) -> None:
    tree = tmp_path / "mltk"
    shutil.copytree(FIXTURE, tree, symlinks=True)
    clash = tree / "core/targets/clash"
    clash.mkdir()
    (clash / "stage4-hello").symlink_to("../../modules/stage4-hello")
    (clash / "sub").symlink_to("../../targets/fixture-sub")
    with pytest.raises(
        modules.ModuleProblem,
        match=r"^target 'clash': stage4-hello is linked to two different modules: core/modules/stage4-hello "
        r"\(by core/targets/clash\) and core/modules/stage4-hello-variant \(by core/targets/fixture-sub\)$",
    ):
        order(tree, ["clash"])
    odd = tree / "core/targets/odd"
    odd.mkdir()
    (odd / "things").symlink_to("../../modules")
    with pytest.raises(
        modules.ModuleProblem,
        match=r"^target 'odd': core/targets/odd/things links to core/modules, which is neither a module "
        r"\(no module.conf\) nor a target$",
    ):
        order(tree, ["odd"])
    # In the config: one line naming the file, the key and the value.
    cfg = plan_config(tmp_path, tree, ["clash"])
    with pytest.raises(ConfigError, match=r"^.*stage4.toml: images.img.mltk.modules = \['clash'\]: target"):
        api.mltk_plan(cfg)


def test_sys_variables_come_from_the_distribution() -> None:
    twelve = sys_variables("debian-12", DEBIAN12)
    assert {k: twelve[k] for k in ("SYS_DISTRIBUTION", "SYS_VERSION", "SYS_CODENAME", "SYS_VERSIONS")} == {
        "SYS_DISTRIBUTION": "debian",
        "SYS_VERSION": "12",
        "SYS_CODENAME": "bookworm",
        "SYS_VERSIONS": "debian.12 debian",
    }
    assert twelve["PACKET_MANAGER"] == "apt" and twelve["PACKET_HANDLER"] == "dpkg"
    assert sys_variables("debian-13", [])["SYS_CODENAME"] == "trixie"
    jammy = sys_variables("ubuntu-22.04", [])
    assert (jammy["SYS_DISTRIBUTION"], jammy["SYS_VERSION"], jammy["SYS_CODENAME"]) == (
        "ubuntu",
        "22.04",
        "jammy",
    )
    rocky = sys_variables("rocky-9", [])
    assert (rocky["SYS_DISTRIBUTION"], rocky["SYS_CODENAME"], rocky["PACKET_HANDLER"]) == ("rocky", "", "rpm")
    # module.conf reads them: the variant's REQUIRED_RELEASE is built from them.
    variant = {m.name: m for m in order(FIXTURE, ["fixture-sub"], "debian-13")}["stage4-hello"]
    assert variant.words("REQUIRED_RELEASE") == ["debian", "13", "trixie", "apt"]


# -- the plan ------------------------------------------------------------------------------------------


def plan_config(
    tmp_path: Path, tree: Path, names: list[str], distribution: str = "debian-12", **mltk: str
) -> config.Config:
    return config.from_dict(
        {
            "build": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "output")},
            "images": {
                "img": {
                    "distribution": distribution,
                    "components": {},
                    "mltk": {"source": {"path": str(tree)}, "modules": names, **mltk},
                }
            },
        },
        str(tmp_path / "stage4.toml"),
    )


def package_index(tmp_path: Path, distro: str = "debian-12") -> None:
    """stage4's own copy of a package index for `distro`: a plain one and a gzip-compressed one."""
    lists = tmp_path / "cache/apt-lists" / distro
    lists.mkdir(parents=True)
    (lists / "main_Packages").write_text("Package: gcc\nVersion: 1\n\nPackage: libc6-dev\nVersion: 1\n")
    (lists / "extra_Packages.gz").write_bytes(
        gzip.compress(b"Package: tree\nVersion: 2\nProvides: tree-virtual (= 2), other-name\n")
    )


def git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    for argv in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(path), *argv], check=True, env=env)
    return path


def reasons_tree(tmp_path: Path) -> Path:
    """A checkout with one module per reason (and ready ones)."""
    tree = tmp_path / "mltk"
    shutil.copytree(FIXTURE, tree, symlinks=True)
    reachable = git_repo(tmp_path / "reachable")
    cached = git_repo(tmp_path / "cached")
    SourceCache(tmp_path / "cache").import_git("https://example.invalid/cached.git", "HEAD", cached, Runner())

    def module(name: str, conf: str = "", build: str = "build() {\n\t:\n}\n") -> None:
        folder = tree / "core/modules" / name
        folder.mkdir()
        (folder / "module.conf").write_text(conf)
        (folder / "module.build").write_text(build)

    module("uses-frobnicate", build="build() {\n\ttarcopy a b\n\tfrobnicate x\n}\n")
    module("uses-tarcopy", build="build() {\n\t# frobnicate in a comment does not count\n\ttarcopy a b\n}\n")
    module("has-init", build="module_init() {\n\t:\n}\n")
    module("system-files", 'REQUIRED_SYSTEM_FILES="/etc/hosts"\n')
    module("downloads", build='fetch_source() {\n\tdownload "https://example.invalid/x.tar.gz"\n}\n')
    module("lacks-package", 'REQUIRED_CONTENT_PACKAGES="tree no-such-package @optional-one"\n')
    module("virtual-package", 'REQUIRED_INSTALLED_PACKAGES="tree-virtual gcc"\n')
    module("git-missing", 'REQUIRED_GIT="file:///nonexistent/stage4-missing.git"\n')
    module("git-reachable", f'REQUIRED_GIT="file://{reachable}"\n')
    module("git-cached", 'REQUIRED_GIT="https://example.invalid/cached.git"\n')
    commit = subprocess.run(["git", "-C", str(cached), "rev-parse", "HEAD"], capture_output=True, text=True)
    # A commit id: in the cache through any ref of the URL (the build takes it the same way).
    module("git-commit", f'REQUIRED_GIT="https://example.invalid/cached.git||{commit.stdout.strip()}"\n')
    module("needs-missing", 'REQUIRED_MODULES="git-missing"\n')
    return tree


REASONS = {
    "uses-frobnicate": "module.build calls frobnicate, which stage4's mltk driver lacks",
    "downloads": "module.build downloads inside the layer (download) from "
    "https://example.invalid/x.tar.gz..., and stage4's source cache has nothing there: seed each URL "
    "with `stage4 sources import URL FILE --download` (git: `--ref REF DIR`)",
    "lacks-package": "debian-12 has no package no-such-package (checked against 2 package indexes of "
    "debian-12 in {cache}/apt-lists/debian-12)",
    "git-missing": "download file:///nonexistent/stage4-missing.git (HEAD, REQUIRED_GIT) is not in stage4's "
    "source cache and cannot be reached; seed it with `stage4 sources import "
    "file:///nonexistent/stage4-missing.git --ref HEAD DIR`",
    "needs-missing": "it requires module git-missing, which is not ready",
}
READY = [
    "uses-tarcopy",
    "has-init",
    "system-files",
    "virtual-package",
    "git-reachable",
    "git-cached",
    "git-commit",
    "stage4-hello",
    "stage4-greeter",
]


def test_plan_names_each_module_with_its_one_reason(tmp_path: Path) -> None:
    tree = reasons_tree(tmp_path)
    package_index(tmp_path)
    cfg = plan_config(tmp_path, tree, [*REASONS, *READY])
    (report,) = api.mltk_plan(cfg)
    found = {m.module.name: m for m in report.modules}
    assert list(found) == [*REASONS, *READY]
    assert [m.order for m in report.modules] == list(range(1, len(found) + 1))
    for name, reason in REASONS.items():
        assert found[name].line == f"mltk module {name}: not ready: " + reason.format(
            cache=tmp_path / "cache"
        )
    assert [m.module.name for m in report.modules if not m.reason] == READY
    assert report.summary == f"{len(READY)} of {len(found)} modules ready"
    assert found["lacks-package"].packages == ["no-such-package", "tree"]
    assert found["git-cached"].downloads == [
        "https://example.invalid/cached.git (REQUIRED_GIT, in the source cache)"
    ]
    assert found["git-reachable"].downloads == [f"file://{tmp_path / 'reachable'} (REQUIRED_GIT, reachable)"]
    assert found["downloads"].downloads == [
        "https://example.invalid/x.tar.gz... (in the layer by download: 0 in the source cache)"
    ]


def test_plan_checks_the_packages_of_the_images_distribution(tmp_path: Path) -> None:
    # [images.NAME.mltk] distro picks module.conf files; the packages still come from the image's release.
    tree = reasons_tree(tmp_path)
    package_index(tmp_path)
    (report,) = api.mltk_plan(plan_config(tmp_path, tree, ["lacks-package"], distro="ubuntu-22.04"))
    assert report.distro == "debian-12"
    assert (report.modules[0].reason or "").startswith("debian-12 has no package no-such-package (")


def test_package_index_from_the_hosts_apt_lists(tmp_path: Path) -> None:
    # Only indexes whose Release file names the release's codename and the distribution as origin, and
    # only its components (Debian: main) count.
    lists = tmp_path / "lists"
    lists.mkdir()
    releases = {
        "deb.debian.org_debian_dists_bookworm": "Origin: Debian\nSuite: oldstable\nCodename: bookworm\n",
        "deb.debian.org_debian_dists_trixie": "Origin: Debian\nSuite: stable\nCodename: trixie\n",
        "example.org_debian_dists_bookworm": "Origin: Example\nSuite: bookworm\nCodename: bookworm\n",
    }
    for stem, release in releases.items():
        (lists / f"{stem}_InRelease").write_text(release)
        for component in ("main", "contrib"):
            name = f"{stem.rsplit('_', 1)[-1]}-{component}-{stem.split('_')[0].split('.')[0]}"
            (lists / f"{stem}_{component}_binary-amd64_Packages").write_text(f"Package: {name}\n")
    index = PackageIndex.load("debian-12", tmp_path / "cache", host_lists=lists)
    assert index.names == {"bookworm-main-deb"}
    assert (
        index.description
        == f"checked against 1 package indexes of debian-12 in the host's apt lists ({lists})"
    )
    # A broken index is one line naming it.
    broken = tmp_path / "cache/apt-lists/debian-13/main_Packages.gz"
    broken.parent.mkdir(parents=True)
    broken.write_text("not gzip")
    with pytest.raises(InputError, match=f"^{re.escape(str(broken))}: cannot read this package index \\("):
        PackageIndex.load("debian-13", tmp_path / "cache", host_lists=lists)
    none = PackageIndex.load("rocky-9", tmp_path / "cache", host_lists=lists)
    assert none.names is None and none.missing(["anything"]) == []
    assert none.description.startswith("packages not checked: no package index of rocky-9 in ")


def run_cli(tmp_path: Path, cfg_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "stage4.toml").write_text(cfg_text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    return subprocess.run(
        [sys.executable, "-m", "stage4", "-c", str(tmp_path / "stage4.toml"), "mltk", "plan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def cli_config(tmp_path: Path, tree: Path, names: list[str]) -> str:
    return (
        f'[build]\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[images.img]\ndistribution = "debian-12"\n[images.img.mltk]\nsource = {{ path = "{tree}" }}\n'
        f"modules = {names!r}\n[images.plain]\n"
    ).replace("'", '"')


def test_plan_command_prints_the_plan_and_exits_1_when_a_module_cannot_run(tmp_path: Path) -> None:
    tree = reasons_tree(tmp_path)
    package_index(tmp_path)
    done = run_cli(tmp_path, cli_config(tmp_path, tree, ["git-missing", "fixture-top"]))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "4 of 5 modules ready"
    assert "   1  git-missing  (core/modules/git-missing)" in lines
    missing = (
        "file:///nonexistent/stage4-missing.git (REQUIRED_GIT, neither in the source cache nor reachable)"
    )
    assert f"        download: {missing}" in lines
    assert "        packages: gcc libc6-dev" in lines  # z-last: core/modules/stage4-hello on debian
    assert sum(line.strip().startswith("mltk module ") for line in lines) == 1
    assert lines.count("        ready") == 4
    done = run_cli(tmp_path, cli_config(tmp_path, tree, ["fixture-top"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "4 of 4 modules ready"
    # Bad input: one line, no traceback.
    for args, message in (
        (["nosuch"], "images.nosuch: no such image"),
        (["plain"], "image 'plain' has no [images.plain.mltk] table"),
    ):
        done = run_cli(tmp_path, cli_config(tmp_path, tree, ["fixture-top"]), *args)
        assert done.returncode != 0 and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_build_refuses_a_module_that_cannot_run_before_the_dev_layer(tmp_path: Path) -> None:
    tree = reasons_tree(tmp_path)
    package_index(tmp_path)
    cfg = plan_config(tmp_path, tree, ["stage4-greeter", "git-missing", "downloads"])
    (report,) = api.mltk_plan(cfg)
    first = report.not_ready[0].line
    ctx = Context(
        "img", cfg.images["img"], cfg.machine, cfg.source, tmp_path / "output", tmp_path / "cache", Runner()
    )
    base = {"kernel_versions": ["6.1.0-1-amd64"], "image": {"file": "no-base.qcow2"}}
    names = "['stage4-greeter', 'git-missing', 'downloads']"
    expected = (
        f"{tmp_path / 'stage4.toml'}: images.img.mltk.modules = {names}: "
        f"{first} (and 1 more: `stage4 mltk plan img` lists them)"
    )
    with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$"):
        dev.build(ctx, "dev-id", base)
    # Refused before the layer: no overlay was made from the (missing) base, no module source fetched.
    assert not list((tmp_path / "output").rglob("*.qcow2"))
    assert not list((tmp_path / "cache").rglob("mltk-git-missing*"))


# -- the public mltk -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["debian-12", "debian-13"])
def test_plan_of_bwlehrpools_stage4_target(tmp_path: Path, distribution: str) -> None:
    require_git(tmp_path / "cache", MLTK_GIT)
    cfg_text = (
        f'[build]\ncache_dir = "{tmp_path / "cache"}"\n[images.bw]\ndistribution = "{distribution}"\n'
        f'[images.bw.mltk]\nsource = {{ git = "{MLTK_GIT}" }}\nmodules = ["stage4"]\n'
    )
    done = run_cli(tmp_path, cfg_text)
    lines = done.stdout.splitlines()
    assert done.returncode in (0, 1), done.stderr
    # 11 modules linked by the stage4 target itself and 73 more by its sub-target bwlp (slxlog is in both).
    blocks = re.split(r"\n(?=\s{1,3}\d+  )", done.stdout.split("\n", 1)[1].rsplit("\n", 2)[0])
    assert len(blocks) == 84, done.stdout[-2000:]
    # bwlp's `kernel` is its own variant kernel-vanilla; the stage4 target's `virtualbox` is vbox-src.
    assert re.search(r"^\s+\d+  kernel  \(core/modules/kernel-vanilla\)$", done.stdout, re.MULTILINE)
    assert re.search(r"^\s+\d+  virtualbox  \(core/modules/vbox-src\)$", done.stdout, re.MULTILINE)
    not_ready = 0
    for block in blocks:
        name = block.split()[1]
        verdicts = [
            line.strip()
            for line in block.splitlines()[1:]
            if not line.strip().startswith(("packages:", "download:"))
        ]
        assert len(verdicts) == 1, block
        assert verdicts[0] == "ready" or verdicts[0].startswith(f"mltk module {name}: not ready: "), block
        not_ready += verdicts[0] != "ready"
    assert lines[-1] == f"{84 - not_ready} of 84 modules ready"
    assert done.returncode == (1 if not_ready else 0)
