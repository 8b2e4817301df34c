"""The dev and prod layers on the real Debian 12 base: provisioning, extraction, flattening, reuse, errors.

One layered image is built on the session's base (same output folder, so the base is reused) with a
local fixture component (a kernel module and a program) and a local fixture dracut module that prints a
marker while the initramfs runs. Everything is real: qemu-storage-daemon, loop devices, chroot Ansible,
qemu under TCG.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stage4 import api
from stage4.errors import ConfigError, StepFailed
from stage4.fsutil import mounts_below, sha256_file
from stage4.image.filesystem import FilesystemReader
from stage4.image.partitions import partitions, raw_view, root_partition
from stage4.runner import Runner
from tests.conftest import STAGE4, BuiltImage, full_matrix, make_config, require

NAME = "debian-12"
pytestmark = pytest.mark.slow


def layered_image_config(project: Path, prod_text: str = "prod v1", extra: dict | None = None) -> dict:
    return {
        "distribution": "debian-12",
        "dev": {"playbooks": [str(project / "playbooks/dev.yml")]},
        "prod": {
            "playbooks": [str(project / "playbooks/prod.yml")],
            "vars": {"stage4_fixture_text": prod_text},
        },
        "initramfs": {"dracut_modules": ["stage4test"], "source": {"path": str(project / "dracut")}},
        "components": {
            "fixture": {
                "source": {"path": str(project / "component")},
                "build": ['make -C "$KDIR" M="$PWD" modules', "gcc -O2 -o stage4-hello hello.c"],
                "artifacts": [
                    {"path": "stage4hello.ko", "kind": "module"},
                    {"path": "stage4-hello", "dest": "/usr/local/bin/stage4-hello", "mode": "0755"},
                ],
            }
        },
        **(extra or {}),
    }


def config_for(base_image: BuiltImage, project: Path, **kwargs):
    # The base fixture's folder: same output folder and settings, so its base is reused.
    return make_config(base_image.output_dir.parent, {NAME: layered_image_config(project, **kwargs)})


def read_files(image: Path, *paths: str) -> dict[str, str | None]:
    """Contents of files in the image's root filesystem, read with debugfs; None where the file's folder
    does not list it (any other failure to read is an error, never taken for absence)."""
    runner = Runner()
    found: dict[str, str | None] = {}
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        with FilesystemReader(raw, root_partition(parts, "SLX_SYS"), runner) as reader:
            for path in paths:
                folder, name = path.rsplit("/", 1)
                if name not in reader.list_dir(folder or "/"):
                    found[path] = None
                    continue
                dest = raw.parent / "out"
                dest.unlink(missing_ok=True)
                reader.copy_out(path, dest)
                found[path] = dest.read_text(errors="replace")
    return found


def listing(image: Path, directory: str) -> list[str]:
    runner = Runner()
    with raw_view(image, runner) as raw:
        _, parts = partitions(raw, runner)
        with FilesystemReader(raw, root_partition(parts, "SLX_SYS"), runner) as reader:
            return reader.list_dir(directory)


def installed(dpkg_status: str, package: str) -> bool:
    for stanza in dpkg_status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace()
        )
        if fields.get("Package") == package:
            return fields.get("Status", "").endswith(" installed")
    return False


@pytest.fixture(scope="module")
def layered(base_image: BuiltImage, project: Path):
    require("qemu-storage-daemon", "losetup", "lsinitrd")
    cfg = config_for(base_image, project)
    started = time.monotonic()
    (result,) = api.build(cfg, [NAME], keep_dev=True)
    assert result.base.reused and result.base.identity == base_image.manifest["identity"]
    return cfg, result, time.monotonic() - started


def test_full_pipeline_builds_dev_and_prod(layered, base_image: BuiltImage) -> None:
    cfg, result, seconds = layered
    print(f"layered build: {seconds:.0f} s")
    assert result.built == ["dev", "prod"]
    image_dir = result.image.parent
    kernel = base_image.manifest["kernel_versions"][-1]

    dev_manifest = json.loads((image_dir / "dev.json").read_text())
    assert dev_manifest["identity"] == result.dev_manifest["identity"]
    assert dev_manifest["parent"] == base_image.manifest["identity"]
    assert dev_manifest["artifacts"]["kernel_version"] == kernel
    assert dev_manifest["files"]
    for relative, facts in dev_manifest["files"].items():
        assert sha256_file(image_dir / relative) == facts["sha256"]
    assert {
        "artifacts/vmlinuz-" + kernel,
        "artifacts/initrd.img-" + kernel,
        "artifacts/components/fixture/stage4hello.ko",
        "artifacts/components/fixture/stage4-hello",
    } <= set(dev_manifest["files"])
    # Facts a later step needs travel forward in the manifests.
    prod_manifest = json.loads((image_dir / "prod.json").read_text())
    assert (prod_manifest["identifier"], prod_manifest["filesystem"]) == ("SLX_SYS", "ext4")
    assert prod_manifest["initramfs"] == str(image_dir / "artifacts" / f"initrd.img-{kernel}")
    assert prod_manifest["dracut_modules"] == ["stage4test"]

    # The dev layer is an overlay on the base (kept with keep_dev) and has the compiler.
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(image_dir / "dev.qcow2")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["backing-filename"] == str(base_image.path)
    assert info["backing-filename-format"] == "qcow2"
    dev_status = read_files(image_dir / "dev.qcow2", "/var/lib/dpkg/status")["/var/lib/dpkg/status"]
    assert installed(dev_status, "gcc") and installed(dev_status, f"linux-headers-{kernel}")
    assert "gcc" in result.dev_manifest["packages"]


def test_prod_image_is_clean_standalone_and_has_the_component(layered, base_image: BuiltImage) -> None:
    cfg, result, _ = layered
    kernel = base_image.manifest["kernel_versions"][-1]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(result.image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "backing-filename" not in info
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1" and data["compression-type"] == "zstd" and not info.get("dirty-flag")
    report = api.inspect(result.image)
    assert report.passed, report.to_dict()

    files = read_files(
        result.image,
        "/var/lib/dpkg/status",
        "/etc/shadow",
        "/etc/passwd",
        "/etc/machine-id",
        f"/lib/modules/{kernel}/modules.dep",
        "/etc/stage4-fixture",
        "/etc/sudoers.d/stage4-build",
        "/usr/local/bin/stage4-hello",
        "/etc/apt/apt.conf.d/00stage4-cache",
    )
    status = files["/var/lib/dpkg/status"]
    assert not installed(status, "gcc") and not installed(status, "build-essential")
    assert not installed(status, f"linux-headers-{kernel}")
    assert "extra/stage4hello.ko" in files[f"/lib/modules/{kernel}/modules.dep"]
    assert files["/usr/local/bin/stage4-hello"] is not None
    assert files["/etc/stage4-fixture"] == "prod v1\n"
    # No password login, no build user or key, nothing host-specific.
    for line in files["/etc/shadow"].splitlines():
        user, password = line.split(":")[:2]
        assert password in ("*", "!*", "!"), f"{user} has a password hash"
    assert "stage4-build" not in files["/etc/passwd"]
    assert files["/etc/sudoers.d/stage4-build"] is None
    assert files["/etc/machine-id"] == ""
    assert files["/etc/apt/apt.conf.d/00stage4-cache"] is None
    assert not [n for n in listing(result.image, "/etc/ssh") if n.startswith("ssh_host_")]
    assert listing(result.image, "/home") == []
    assert not listing(result.image, "/var/lib/apt/lists") or listing(result.image, "/var/lib/apt/lists") == [
        "partial"
    ]


def test_extracted_initramfs_has_the_fixture_module_for_the_image_kernel(
    layered, base_image: BuiltImage
) -> None:
    _, result, _ = layered
    kernel = base_image.manifest["kernel_versions"][-1]
    out = subprocess.run(
        ["lsinitrd", str(result.artifacts_dir / f"initrd.img-{kernel}")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "stage4test" in out.split("dracut modules:", 1)[1]
    assert f"lib/modules/{kernel}/" in out
    assert result.dev_manifest["artifacts"]["initramfs_dracut_modules"].count("stage4test") == 1


def test_prod_boots_with_the_extracted_kernel_and_initramfs(layered, base_image: BuiltImage) -> None:
    cfg, result, _ = layered
    kernel = base_image.manifest["kernel_versions"][-1]
    booted = api.boot(
        cfg,
        result.image,
        via="kernel",
        kernel=result.artifacts_dir / f"vmlinuz-{kernel}",
        initrd=result.artifacts_dir / f"initrd.img-{kernel}",
        timeout=600,
    )
    log = booted.serial_log.read_text(errors="replace")
    assert "STAGE4-TEST-DRACUT-MODULE" in log
    assert f"STAGE4-USERSPACE-UP {booted.marker}" in log


def test_unchanged_rebuild_builds_nothing(layered) -> None:
    cfg, first, _ = layered
    started = time.monotonic()
    (again,) = api.build(cfg, [NAME], keep_dev=True)
    print(f"no-change rebuild: {time.monotonic() - started:.1f} s")
    assert again.built == [] and again.reused and again.base.reused
    assert again.identity == first.identity
    assert again.dev_manifest["identity"] == first.dev_manifest["identity"]


def test_layers_lists_the_chain(layered, project: Path, tmp_path: Path) -> None:
    cfg, result, _ = layered
    found = api.layers(cfg, [NAME])[NAME]
    assert [s.name for s in found] == ["base", "dev", "prod"]
    assert all(s.state.startswith("cached, up to date") for s in found), [s.state for s in found]
    assert found[-1].identity == result.identity and found[-1].size == result.image.stat().st_size
    toml = tmp_path / "stage4.toml"
    toml.write_text(
        _toml(
            {
                "build": {"output_dir": str(cfg.build.output_dir), "cache_dir": str(cfg.build.cache_dir)},
                "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
                "images": {NAME: layered_image_config(project)},
            }
        )
    )
    out = subprocess.run([STAGE4, "-c", str(toml), "layers", NAME], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == NAME and len(lines) == 1 + len(found), out.stdout
    for line, status in zip(lines[1:], found, strict=True):
        assert status.name in line and status.identity[:16] in line and "cached, up to date" in line


def test_bad_inputs_name_layer_step_and_log_and_keep_the_image(
    layered, base_image: BuiltImage, project: Path, tmp_path: Path
) -> None:
    cfg, result, _ = layered
    before = sha256_file(result.image)

    def failing(cfg, *words: str) -> str:
        with pytest.raises(StepFailed) as caught:
            api.build(cfg, [NAME])
        message = str(caught.value)
        for word in words:
            assert word in message, message
        assert "(log: " in message and Path(message.rsplit("(log: ", 1)[1].rstrip(")")).is_file()
        assert sha256_file(result.image) == before
        return message

    # A missing playbook is bad input, found when the config is read (no build starts).
    with pytest.raises(ConfigError, match=r"images\.\S+\.prod\.playbooks\.0 = .*nope\.yml.*: no such file"):
        make_config(
            base_image.output_dir.parent,
            {NAME: {**layered_image_config(project), "prod": {"playbooks": [str(tmp_path / "nope.yml")]}}},
        )

    bad_task = tmp_path / "fail.yml"
    bad_task.write_text(
        "- hosts: all\n  tasks:\n    - name: Deliberately failing task\n"
        "      ansible.builtin.command: /bin/false\n"
    )
    failing(
        make_config(
            base_image.output_dir.parent,
            {NAME: {**layered_image_config(project), "prod": {"playbooks": [str(bad_task)]}}},
        ),
        "prod: provision (chroot)",
        "Deliberately failing task",
    )

    tarball = tmp_path / "src.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(project / "component"), "."], check=True)
    wrong = layered_image_config(project)
    wrong["components"] = {
        "fixture": {**wrong["components"]["fixture"], "source": {"tarball": str(tarball), "sha256": "0" * 64}}
    }
    failing(
        make_config(base_image.output_dir.parent, {NAME: wrong}), "dev: fetch sources", "checksum mismatch"
    )

    # The first failing build command stops the component; its own output is the message, and the next
    # command (whose failure would be a confusing follow-on) never runs.
    broken = layered_image_config(project)
    broken["components"] = {
        "fixture": {
            **broken["components"]["fixture"],
            "build": ["echo configured; echo the-real-cause >&2; exit 3", "echo the-follow-on >&2; exit 4"],
        }
    }
    message = failing(
        make_config(base_image.output_dir.parent, {NAME: broken}),
        "dev: provision (chroot)",
        "component fixture: 'echo configured; echo the-real-cause >&2; exit 3' failed with exit code 3",
        "the-real-cause",
    )
    assert "the-follow-on" not in message and "exit 4" not in message


def test_prod_only_change_rebuilds_only_prod(
    layered, base_image: BuiltImage, project: Path, tmp_path: Path
) -> None:
    cfg, first, _ = layered
    # A changed copy of the project: the shared fixture project stays as the other tests expect it.
    changed_project = tmp_path / "project"
    shutil.copytree(project, changed_project)
    playbook = changed_project / "playbooks/prod.yml"
    playbook.write_text(playbook.read_text().replace("Leave a file", "Leave one file"))
    changed = config_for(base_image, changed_project, prod_text="prod v2")  # same dev inputs by content
    (again,) = api.build(changed, [NAME])
    assert again.built == ["prod"]
    assert again.base.identity == first.base.identity
    assert again.dev_manifest["identity"] == first.dev_manifest["identity"]
    assert again.identity != first.identity
    assert json.loads((again.image.parent / "prod.json").read_text())["identity"] == again.identity
    assert read_files(again.image, "/etc/stage4-fixture")["/etc/stage4-fixture"] == "prod v2\n"


def _attached_to(path: Path) -> list[str]:
    loops = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True, text=True
    ).stdout
    procs = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = [line for line in loops.splitlines() if str(path) in line]
    found += [
        line for line in procs.splitlines() if str(path) in line and ("qemu" in line or "ansible" in line)
    ]
    found += mounts_below(path)
    return found


def _descendant_names(pid: int) -> set[str]:
    """The command names (/proc/PID/comm) of the processes below `pid`."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        child = int(stat.parent.name)
        parents[child], names[child] = int(rest[1]), name
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= {names[child] for child in frontier}
    return found


@full_matrix  # SIGTERM: test_interrupt (a build, a boot); the dev step: test_recovery (SIGKILL)
def test_sigterm_during_dev_leaves_nothing_attached_and_a_rerun_succeeds(
    layered, base_image: BuiltImage, project: Path, tmp_path: Path
) -> None:
    cfg, first, _ = layered
    work = cfg.build.cache_dir / "work"
    toml = tmp_path / "stage4.toml"
    data = {
        "build": {"output_dir": str(base_image.output_dir), "cache_dir": str(cfg.build.cache_dir)},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": {NAME: layered_image_config(project, extra={})},
    }
    data["images"][NAME]["dev"]["vars"] = {"interrupted": "yes"}  # a new dev identity
    toml.write_text(_toml(data))
    proc = subprocess.Popen(
        [STAGE4, "-c", str(toml), "build", NAME], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Ansible running in the attached dev layer, seen in the process table (stat and comm only: reading a
    # process's command line can stall while it waits on the FUSE export).
    deadline = time.monotonic() + 600
    while "ansible-playboo" not in _descendant_names(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "Ansible never started in the dev layer"
        time.sleep(0.5)
    assert any(m.endswith("/dev/attach/export.raw") for m in mounts_below(work)), mounts_below(work)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert _attached_to(work) == [], out
    assert (
        sha256_file(first.image)
        == json.loads((first.image.parent / "prod.json").read_text())["image"]["sha256"]
    )

    rerun = subprocess.run(
        [STAGE4, "-c", str(toml), "build", NAME], capture_output=True, text=True, timeout=1200
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _attached_to(work) == []


def _toml(data: dict) -> str:
    """A small TOML writer for the test's config (tables, strings, lists, inline tables)."""

    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    lines = []
    for section, body in data.items():
        if section == "images":
            for name, image in body.items():
                lines.append(f'[images."{name}"]')
                lines += [f"{json.dumps(k)} = {value(v)}" for k, v in image.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{json.dumps(k)} = {value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"
