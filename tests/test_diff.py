"""`stage4 diff` over hand-made manifests and export records (fast; the real builds are in test_rollouts)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from stage4 import api, diff
from stage4.errors import InputError
from tests.conftest import STAGE4

KERNEL = "6.1.0-57-amd64"


def write_build(folder: Path, prod_id: str, packages: dict[str, str], size: int) -> Path:
    """base.json, dev.json and prod.json of one layered build, as the pipeline writes them."""
    folder.mkdir(parents=True)
    base = {
        "kind": "base",
        "identity": "b" * 64,
        "parent": None,
        "kernel_versions": [KERNEL],
        "packages": {"bash": "5.2", "linux-image-amd64": "6.1.192-3"},
        "image": {"file": "base.qcow2", "size": 400 << 20, "virtual_size": 3 << 30},
    }
    dev = {
        "kind": "dev",
        "identity": "d" * 64,
        "parent": "b" * 64,
        "kernel_version": KERNEL,
        "artifacts": {
            "initramfs_dracut_modules": ["base", "dnbd3-rootfs"],
            "components": {"dnbd3": [{"file": "components/dnbd3/dnbd3.ko", "kind": "module"}]},
        },
    }
    prod = {
        "kind": "prod",
        "identity": prod_id,
        "parent": "d" * 64,
        "dev_identity": "d" * 64,
        "identifier": "SLX_SYS",
        "kernel_version": KERNEL,
        "dracut_modules": ["dnbd3-rootfs"],
        "artifacts_installed": [{"src": "/x/artifacts/components/dnbd3/dnbd3.ko", "kind": "module"}],
        "kernel_hold": {
            "method": "apt-mark hold",
            "packages": ["linux-image-amd64", f"linux-image-{KERNEL}"],
        },
        "packages": packages,
        "image": {"file": "prod.qcow2", "size": size, "virtual_size": 3 << 30},
    }
    for name, manifest in (("base.json", base), ("dev.json", dev), ("prod.json", prod)):
        (folder / name).write_text(json.dumps(manifest))
    return folder / "prod.json"


@pytest.fixture
def two_builds(tmp_path: Path) -> tuple[Path, Path]:
    a = write_build(tmp_path / "a", "1" * 64, {"bash": "5.2", "curl": "7.88", "vim": "9.0.1"}, 500 << 20)
    b = write_build(tmp_path / "b", "2" * 64, {"bash": "5.2", "tree": "2.1.0-1", "vim": "9.0.2"}, 501 << 20)
    return a, b


def test_two_manifests_show_exactly_the_differences(two_builds) -> None:
    found = api.diff(*two_builds)
    assert found["packages"] == {
        "added": {"tree": "2.1.0-1"},
        "removed": {"curl": "7.88"},
        "changed": {"vim": {"a": "9.0.1", "b": "9.0.2"}},
    }
    assert found["identities"]["prod"] == {"a": "1" * 64, "b": "2" * 64, "changed": True}
    assert found["identities"]["dev"] == {"a": "d" * 64, "b": "d" * 64, "changed": False}
    assert found["identities"]["base"] == {"a": "b" * 64, "b": "b" * 64, "changed": False}
    assert found["kernel"] == {"a": [KERNEL], "b": [KERNEL], "changed": False}
    assert found["kernel_modules"]["a"] == ["dnbd3.ko"] and not found["kernel_modules"]["changed"]
    assert found["dracut_modules"]["b"] == ["dnbd3-rootfs"]
    assert found["sizes"]["size"] == {"a": 500 << 20, "b": 501 << 20, "changed": True}
    assert not found["sizes"]["virtual_size"]["changed"]
    text = diff.text(found)
    assert "  + tree 2.1.0-1\n" in text and "  - curl 7.88\n" in text and "  ~ vim 9.0.1 -> 9.0.2\n" in text
    assert f"kernel: {KERNEL} (same)" in text and "image size: 500.0 MiB -> 501.0 MiB (+1.0 MiB)" in text
    assert "dev identity: dddddddddddddddd (same)" in text
    assert "prod identity: 1111111111111111 -> 2222222222222222" in text


def test_a_manifest_with_itself_shows_nothing_changed(two_builds) -> None:
    found = api.diff(two_builds[0], two_builds[0])
    assert found["packages"] == {"added": {}, "removed": {}, "changed": {}}
    assert not any(pair["changed"] for pair in found["identities"].values())


def test_cli_json_and_text(two_builds) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(diff.__file__).parents[1])}
    out = subprocess.run(
        [STAGE4, "diff", "--json", *map(str, two_builds)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["packages"]["added"] == {"tree": "2.1.0-1"}
    out = subprocess.run(
        [STAGE4, "diff", *map(str, two_builds)], check=False, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0 and "packages: 1 added, 1 removed, 1 changed" in out.stdout, out.stdout


def record(rid: int, manifest: Path | None, identity: str, size: int) -> dict:
    """A publication record as `stage4 export` writes it (format stage4-publication/1)."""
    return {
        "format": "stage4-publication/1",
        "name": "lab/desktop",
        "rid": rid,
        "file": f"desktop.r{rid}",
        "size": size + 4096,
        "identifier": "SLX_SYS",
        "source": {
            "image": "/nowhere/prod.qcow2",
            "size": size,
            "identity": identity,
            "manifest": str(manifest) if manifest else None,
            "dracut_modules": ["dnbd3-rootfs"],
        },
    }


def test_exported_revisions_through_their_records_and_the_store(two_builds, tmp_path: Path) -> None:
    a, b = two_builds
    store = tmp_path / "store"
    meta = store / ".stage4" / "lab" / "desktop"
    meta.mkdir(parents=True)
    (store / "lab").mkdir()
    for rid, manifest, identity in ((1, a, "1" * 64), (2, b, "2" * 64)):
        (meta / f"publication.r{rid}.json").write_text(json.dumps(record(rid, manifest, identity, 500 << 20)))
        (store / "lab" / f"desktop.r{rid}").write_bytes(b"\0" * 4096)
    found = api.diff(store / "lab/desktop.r1", store / "lab/desktop.r2")
    assert found["packages"]["added"] == {"tree": "2.1.0-1"}
    assert (found["a"]["revision"], found["b"]["revision"]) == (1, 2)
    same = api.diff(meta / "publication.r1.json", store / "lab/desktop.r2")
    assert same["packages"] == found["packages"]


def test_summary_for_export_with_and_without_the_build_manifest(two_builds) -> None:
    a, b = two_builds
    text = diff.summary(record(3, a, "1" * 64, 500 << 20), record(4, b, "2" * 64, 501 << 20))
    assert "  + tree 2.1.0-1\n" in text and "prod identity: 1111111111111111 -> 2222222222222222" in text
    # The manifest of the earlier build is gone (or was rebuilt): only what the record says.
    gone = diff.summary(record(3, None, "1" * 64, 500 << 20), record(4, b, "2" * 64, 501 << 20))
    assert "packages: not known for both sides" in gone
    # A record that carries its build manifest needs no file beside the image.
    carried = record(3, None, "1" * 64, 500 << 20) | {"build": json.loads(a.read_text())}
    assert "  + tree 2.1.0-1\n" in diff.summary(carried, record(4, b, "2" * 64, 501 << 20))
    assert "image size: 500.0 MiB -> 501.0 MiB (+1.0 MiB)" in gone


def test_bad_input_is_one_line_with_exit_code_2(two_builds, tmp_path: Path) -> None:
    stray = tmp_path / "stray.qcow2"
    stray.write_bytes(b"QFI\xfb")
    not_manifest = tmp_path / "other.json"
    not_manifest.write_text('{"hello": 1}')
    env = {**os.environ, "PYTHONPATH": str(Path(diff.__file__).parents[1])}
    for target, words in (
        (tmp_path / "missing.json", "no such file"),
        (stray, "no stage4 manifest beside it"),
        (not_manifest, "not a stage4 manifest"),
    ):
        with pytest.raises(InputError, match=words):
            api.diff(two_builds[0], target)
        out = subprocess.run(
            [STAGE4, "diff", str(two_builds[0]), str(target)],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 2 and out.stdout == "", out
        assert len(out.stderr.strip().splitlines()) == 1 and words in out.stderr, out.stderr
    with pytest.raises(InputError, match="image file is not there"):
        api.diff(*two_builds, files=True)
