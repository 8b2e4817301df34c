"""What mltk modules download inside the layer comes from stage4's source cache (mltk/downloads.py), fast:
which calls count (not a word in a message, not a loop over an empty REQUIRED_* variable), the URL
beginnings a module names, the plan's reason when the cache has nothing under them, the build plan's
served files and git trees with their index, and the driver's download, download_untar, wget, curl and
git clone serving them by URL (run for real on the host, from folders laid out as the dev role lays them
out) and failing on any other URL with the seed command. The image test (test_mltk_image.py) runs the
same in a real dev and prod layer."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.context import Context
from stage4.errors import ConfigError
from stage4.mltk import plan
from stage4.mltk.plan import DRIVER
from stage4.provisioning.source_cache import SourceCache
from stage4.runner import Runner
from tests.test_mltk_plan import git_repo

FILE_URL = "https://files.example.invalid/stage4/payload-1.0.tar.gz"
LOGO_URL = "https://files.example.invalid/logo.php?distro=Debian"
GIT_URL = "https://git.example.invalid/stage4/tool.git"
BUILD = """\
fetch_source() {
	# download "https://in-a-comment.invalid/x" does not count
	download_untar "${REQUIRED_URL//%VERSION%/1.0}" "$MODULE_WORK_DIR/src"
	wget -q -t 3 -O wget.out "https://files.example.invalid/stage4/payload-1.0.tar.gz"
	curl -fsSL "https://files.example.invalid/stage4/payload-1.0.tar.gz" > curl.out
	curl -sSfLo curl-o.out "https://files.example.invalid/stage4/payload-1.0.tar.gz"
	git clone --depth 1 -b v1 "https://git.example.invalid/stage4/${TOOL}.git" tool || perror "clone failed"
	pwarning "Could not download anything else"
}
build() {
	mkdir -p "$MODULE_BUILD_DIR/usr/share/dl"
	cp "$MODULE_WORK_DIR/src/payload.txt" wget.out curl.out curl-o.out tool/VERSION \
		"$MODULE_BUILD_DIR/usr/share/dl/"
}
post_copy() {
	wget -O "$MODULE_WORK_DIR/logo.png" "https://files.example.invalid/logo.php?distro=${DIST:-Debian}"
}
"""
CONF = """\
REQUIRED_URL="https://files.example.invalid/stage4/payload-%VERSION%.tar.gz"
REQUIRED_DIRECTORIES="/usr/share/dl"
"""


def module(tree: Path, name: str, build: str, conf: str = "") -> None:
    folder = tree / "core/modules" / name
    folder.mkdir(parents=True)
    (folder / "module.conf").write_text(conf)
    (folder / "module.build").write_text(build)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    tree = tmp_path / "mltk"
    module(tree, "dl", BUILD.replace("${TOOL}", "tool"), CONF)
    # xorg's way: a loop over a REQUIRED_* variable module.conf leaves empty never runs.
    module(
        tree,
        "dl-guarded",
        'fetch_source() {\n\tif [ -n "$REQUIRED_DRIVERS" ]; then\n\t\tfor d in $REQUIRED_DRIVERS; do\n'
        '\t\t\tgit clone "https://x.invalid/$d.git"\n\t\tdone\n\tfi\n}\n',
        'REQUIRED_DRIVERS=""\n',
    )
    module(tree, "dl-unnamed", 'fetch_source() {\n\twget -O x "$SOME_URL"\n}\n')
    return tree


def cfg_for(tmp_path: Path, tree: Path, names: list[str]) -> config.Config:
    return config.from_dict(
        {
            "build": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "output")},
            "images": {
                "img": {
                    "distribution": "debian-12",
                    "components": {},
                    "mltk": {"source": {"path": str(tree)}, "modules": names},
                }
            },
        },
        str(tmp_path / "stage4.toml"),
    )


def tarball(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    return path


def seed(tmp_path: Path) -> None:
    cache = SourceCache(tmp_path / "cache")
    cache.import_download(FILE_URL, tarball(tmp_path / "payload.tar.gz", {"payload.txt": "payload 1.0\n"}))
    logo = tmp_path / "logo.png"
    logo.write_bytes(b"\x89PNG stage4 logo")
    cache.import_download(LOGO_URL, logo)
    repo = git_repo(tmp_path / "tool")
    (repo / "VERSION").write_text("tool v1\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    for argv in (["add", "VERSION"], ["commit", "-qm", "v1"], ["tag", "v1"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env)
    cache.import_git(GIT_URL, "v1", repo, Runner())


def test_plan_names_the_url_beginnings_and_refuses_without_cache_entries(tmp_path: Path, tree: Path) -> None:
    (report,) = api.mltk_plan(cfg_for(tmp_path, tree, ["dl", "dl-guarded", "dl-unnamed"]))
    found = {m.module.name: m for m in report.modules}
    starts = [
        "https://files.example.invalid/logo.php?distro=${DIST:-Debian}",
        "https://files.example.invalid/stage4/payload-%VERSION%.tar.gz",
        "https://files.example.invalid/stage4/payload-1.0.tar.gz",
        "https://git.example.invalid/stage4/tool.git",
    ]
    assert found["dl"].reason == (
        "module.build downloads inside the layer (curl, download_untar, git clone, wget) from "
        + " or ".join(f"{s}..." for s in starts)
        + ", and stage4's source cache has nothing there: seed each URL with "
        "`stage4 sources import URL FILE --download` (git: `--ref REF DIR`)"
    )
    assert found["dl"].downloads == [
        f"{s}... (in the layer by curl, download_untar, git clone, wget: 0 in the source cache)"
        for s in starts
    ]
    assert found["dl-guarded"].reason is None and found["dl-guarded"].downloads == []
    assert found["dl-unnamed"].reason == (
        "module.build downloads inside the layer (wget) from URLs it does not name; "
        "stage4 serves downloads only from its source cache"
    )
    # The build refuses it before the layer, with the same line.
    cfg = cfg_for(tmp_path, tree, ["dl"])
    ctx = Context(
        "img", cfg.images["img"], cfg.machine, cfg.source, tmp_path / "out", tmp_path / "cache", Runner()
    )
    with pytest.raises(
        ConfigError, match="mltk module dl: not ready: module.build downloads inside the layer"
    ):
        plan.prepare(ctx, tmp_path / "sources", "fetch sources")


def served_plan(tmp_path: Path, tree: Path) -> plan.BuildPlan:
    seed(tmp_path)
    cfg = cfg_for(tmp_path, tree, ["dl"])
    (report,) = api.mltk_plan(cfg)
    assert report.modules[0].reason is None
    assert report.modules[0].downloads[0].endswith(": 1 in the source cache)")
    ctx = Context(
        "img", cfg.images["img"], cfg.machine, cfg.source, tmp_path / "out", tmp_path / "cache", Runner()
    )
    return plan.prepare(ctx, tmp_path / "sources", "fetch sources")


def lay_out(built: plan.BuildPlan, root: Path) -> Path:
    """The module's downloads folder as the dev role makes it (stage4_mltk_build: tasks/main.yml)."""
    folder = root / "dl"
    for item in built["served"]:
        slot = folder / item["slot"]
        if item["git"]:
            (slot / "tree").mkdir(parents=True)
            with tarfile.open(item["source"]) as archive:
                archive.extractall(slot / "tree", filter="tar")
        else:
            slot.mkdir(parents=True)
            shutil.copyfile(item["source"], slot / "file")
    (folder / "index").write_text(built["download_index"]["dl"])
    return folder


def driver(
    action: str, tmp_path: Path, module_dir: Path, work: Path, **env: str
) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "MODULE": "dl",
        "MODULE_DIR": str(module_dir),
        "MODULE_WORK_DIR": str(work),
        "MODULE_BUILD_DIR": str(work / ("build" if action == "build" else "files")),
        "ROOT_DIR": str(tmp_path),
        "STAGE4_MLTK_OUT": str(tmp_path / "out"),
        **env,
    }
    return subprocess.run(
        ["bash", str(DRIVER), action], env=environ, capture_output=True, text=True, cwd=tmp_path
    )


def test_driver_serves_the_modules_downloads_from_the_cache(tmp_path: Path, tree: Path) -> None:
    built = served_plan(tmp_path, tree)
    # The payload (a file), the logo (post_copy's: kept in the result) and the git tree at v1.
    slots = {s["slot"]: s["git"] for s in built["served"]}
    index = sorted(line.split("\t") for line in built["download_index"]["dl"].splitlines())
    assert [(kind, url, ref) for kind, url, ref, _ in index] == [
        ("file", LOGO_URL, "-"),
        ("file", FILE_URL, "-"),
        ("git", GIT_URL, "v1"),
    ]
    for kind, _url, _ref, path in index:
        slot, name = path.split("/")
        assert (name, slots[slot]) == (("tree", True) if kind == "git" else ("file", False))
    assert built["modules"][0]["keep_downloads"] is True
    downloads = lay_out(built, tmp_path / "layer-downloads")
    done = driver(
        "build",
        tmp_path,
        tree / "core/modules/dl",
        tmp_path / "work",
        STAGE4_MLTK_DOWNLOADS=str(downloads),
        STAGE4_MLTK_KEEP_DOWNLOADS="1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = tmp_path / "out/dl.tar"
    with tarfile.open(result) as archive:
        names = archive.getnames()
        read = {n.rsplit("/", 1)[1]: archive.extractfile(n).read() for n in names if "/usr/share/dl/" in n}
    payload = (tmp_path / "payload.tar.gz").read_bytes()
    assert read == {
        "payload.txt": b"payload 1.0\n",
        "wget.out": payload,
        "curl.out": payload,
        "curl-o.out": payload,
        "VERSION": b"tool v1\n",
    }
    # The result carries the downloads for post_copy in the prod layer, which runs without the index.
    assert "downloads/index" in names
    installed = tmp_path / "installed"
    installed.mkdir()
    with tarfile.open(result) as archive:
        archive.extractall(installed, filter="tar")
    done = driver("install", tmp_path, installed / "module", installed)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (installed / "logo.png").read_bytes() == b"\x89PNG stage4 logo"


def test_driver_refuses_a_url_the_cache_does_not_have(tmp_path: Path, tree: Path) -> None:
    built = served_plan(tmp_path, tree)
    downloads = lay_out(built, tmp_path / "layer-downloads")
    module(tree, "dl-v2", BUILD.replace("${TOOL}", "other-tool"), CONF)
    done = driver(
        "build",
        tmp_path,
        tree / "core/modules/dl-v2",
        tmp_path / "work",
        STAGE4_MLTK_DOWNLOADS=str(downloads),
    )
    assert done.returncode != 0
    other = "https://git.example.invalid/stage4/other-tool.git"
    assert done.stderr.splitlines()[0] == "mltk module dl: fetch_source failed (exit 1); its last lines:"
    assert (
        f"download {other} (v1, git clone) is not in stage4's source cache; seed it with "
        f"`stage4 sources import {other} --ref v1 DIR`"
    ) in done.stderr
    # A file: download (and download_untar) stop the module; wget and curl fail as they would offline.
    check = tmp_path / "check.sh"
    check.write_text(
        'fetch_source() {\n\twget -O x "https://files.example.invalid/nope"; echo "wget $?"\n'
        '\tcurl -fsS "https://files.example.invalid/nope"; echo "curl $?"\n'
        '\tdownload "https://files.example.invalid/nope"\n\techo "not reached"\n}\n'
    )
    folder = tmp_path / "check-module"
    folder.mkdir()
    shutil.copyfile(check, folder / "module.build")
    (folder / "module.conf").write_text("")
    done = driver("build", tmp_path, folder, tmp_path / "work2", STAGE4_MLTK_DOWNLOADS=str(downloads))
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "wget 8" in out and "curl 22" in out and "not reached" not in out
    assert (
        "download https://files.example.invalid/nope is not in stage4's source cache; seed it with "
        "`stage4 sources import https://files.example.invalid/nope FILE --download`"
    ) in out


def test_sources_import_download(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path, tmp_path, ["x"])
    file = tmp_path / "NVIDIA-Linux-x86_64-535.run"
    file.write_bytes(b"#!/bin/sh\nnot a tarball\n")
    entry = api.import_source(
        cfg, "https://files.example.invalid/NVIDIA-Linux-x86_64-535.run", file, download=True
    )
    assert entry.kind == "download" and entry.size == file.stat().st_size
    assert [e.kind for e in api.sources(cfg)] == ["download"]
    # Bad input: one line each.
    for url, path, sha, message in (
        ("file:///x", file, None, "file:///x: a download's URL starts with http://, https:// or ftp://"),
        ("https://x.invalid/y", tmp_path / "nope", None, "no such file"),
        ("https://x.invalid/y", file, "0" * 64, "sha256 is"),
    ):
        with pytest.raises(Exception, match=message):
            api.import_source(cfg, url, path, sha256=sha, download=True)
