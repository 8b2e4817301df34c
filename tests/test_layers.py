"""The dev and prod layers on the real Debian 12 base: provisioning, extraction, flattening, reuse, errors.

The run's layered image (conftest's `layered`: a local fixture component with a kernel module and a
program, a local fixture dracut module that prints a marker while the initramfs runs) is checked from
every side; the changed builds run in image folders of their own, seeded with its finished steps.
Everything is real: qemu-storage-daemon, loop devices, chroot Ansible, qemu under TCG.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stage4 import api
from stage4.errors import ConfigError, StepFailed
from stage4.fsutil import mounts_below, sha256_file
from stage4.image.partitions import partitions, raw_view
from stage4.runner import Runner
from tests.conftest import (
    STAGE4,
    BuiltImage,
    Layered,
    full_matrix,
    layered_image_config,
    make_config,
    variant,
)
from tests.readback import attached_to, installed, listing, read_files

NAME = Layered.NAME
pytestmark = pytest.mark.slow


def config_for(layered: Layered, folder: Path, project: Path, steps=("base", "dev", "prod"), **kwargs):
    """A variant of the layered image from `project`, in `folder`, seeded with the layered image's
    `steps`."""
    return variant(layered.image_dir, folder, layered_image_config(project, **kwargs), steps)


def test_full_pipeline_builds_dev_and_prod(layered: Layered, base_image: BuiltImage) -> None:
    result = layered.result
    print(f"layered build: {layered.seconds:.0f} s")
    assert layered.built == ["dev", "prod"]
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
    assert info["backing-filename"] == str(image_dir / "base.qcow2")  # the base in the image's folder
    assert sha256_file(image_dir / "base.qcow2") == base_image.manifest["image"]["sha256"]
    assert info["backing-filename-format"] == "qcow2"
    dev_status = read_files(image_dir / "dev.qcow2", "/var/lib/dpkg/status")["/var/lib/dpkg/status"]
    assert installed(dev_status, "gcc") and installed(dev_status, f"linux-headers-{kernel}")
    assert "gcc" in result.dev_manifest["packages"]


def test_prod_image_is_clean_standalone_and_has_the_component(
    layered: Layered, base_image: BuiltImage
) -> None:
    result = layered.result
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
        "/etc/dpkg/dpkg.cfg.d/00stage4-unsafe-io",
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
    assert files["/etc/dpkg/dpkg.cfg.d/00stage4-unsafe-io"] is None
    assert not [n for n in listing(result.image, "/etc/ssh") if n.startswith("ssh_host_")]
    assert listing(result.image, "/home") == []
    assert not listing(result.image, "/var/lib/apt/lists") or listing(result.image, "/var/lib/apt/lists") == [
        "partial"
    ]


def test_extracted_initramfs_has_the_fixture_module_for_the_image_kernel(
    layered: Layered, base_image: BuiltImage
) -> None:
    result = layered.result
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


def test_prod_takes_the_dev_module_index_which_equals_a_fresh_depmod(
    layered: Layered, base_image: BuiltImage, tmp_path: Path
) -> None:
    """The prod layer's module index is the dev layer's (its module tree is the same), and it is what the
    host's depmod makes of the prod image's module tree."""
    kernel = base_image.manifest["kernel_versions"][-1]
    assert layered.result.dev_manifest["artifacts"]["module_index"] == "modules-index.tar"
    # The install role reports which index the image got: the dev layer's, or depmod's.
    logs = "".join(p.read_text() for p in sorted((layered.image_dir / "logs").glob("build-*.log")))
    outcomes = re.findall(r'"module index: ([^"]*)"', logs)
    assert outcomes and outcomes[-1] == "the dev layer's", outcomes
    modules = f"lib/modules/{kernel}"
    with raw_view(layered.result.image, Runner()) as raw:
        (root_part,) = [p for p in partitions(raw, Runner())[1] if p.name == "SLX_SYS"]
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(
            ["mount", "-o", f"ro,loop,offset={root_part.offset},sizelimit={root_part.size}", raw, mnt],
            check=True,
        )
        try:
            shutil.copytree(mnt / modules, tmp_path / "fresh" / modules, symlinks=True)
        finally:
            subprocess.run(["umount", mnt], check=True)
    image_index = {p.name: p.read_bytes() for p in (tmp_path / "fresh" / modules).glob("modules.*")}
    subprocess.run(["depmod", "-b", tmp_path / "fresh", kernel], check=True)
    fresh_index = {p.name: p.read_bytes() for p in (tmp_path / "fresh" / modules).glob("modules.*")}
    assert "extra/stage4hello.ko:" in image_index["modules.dep"].decode()
    assert image_index == fresh_index


def test_prod_boots_with_the_extracted_kernel_and_initramfs(layered: Layered, base_image: BuiltImage) -> None:
    cfg, result = layered.config, layered.result
    kernel = base_image.manifest["kernel_versions"][-1]
    booted = api.boot(
        cfg,
        result.image,
        via="kernel",
        kernel=result.artifacts_dir / f"vmlinuz-{kernel}",
        initrd=result.artifacts_dir / f"initrd.img-{kernel}",
        timeout=600,
        kernel_args=("stage4.test=kernel-arg",),
    )
    log = booted.serial_log.read_text(errors="replace")
    assert "STAGE4-TEST-DRACUT-MODULE" in log
    # --kernel-arg: last on the command line the kernel got
    assert re.search(r"Command line: .* stage4\.test=kernel-arg\s*$", log, re.MULTILINE), log[:3000]
    assert f"STAGE4-USERSPACE-UP {booted.marker}" in log


def test_unchanged_rebuild_builds_nothing(layered: Layered) -> None:
    cfg, first = layered.config, layered.result
    started = time.monotonic()
    (again,) = api.build(cfg, [NAME], keep_dev=True)
    print(f"no-change rebuild: {time.monotonic() - started:.1f} s")
    assert again.built == [] and again.reused and again.base.reused
    assert again.identity == first.identity
    assert again.dev_manifest["identity"] == first.dev_manifest["identity"]


def test_layers_lists_the_chain(layered: Layered, tmp_path: Path) -> None:
    cfg, result = layered.config, layered.result
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
                "images": {NAME: layered.image_config()},
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
    layered: Layered, project: Path, tmp_path: Path
) -> None:
    # The failing builds run in a copy of the layered image's folder.
    cfg = config_for(layered, tmp_path / "copy", project)
    image = cfg.build.output_dir / NAME / "prod.qcow2"
    before = sha256_file(image)

    def config_with(image: dict):
        return make_config(tmp_path / "copy", {NAME: image}, cfg.build.cache_dir)

    def failing(cfg, step: str, *words: str) -> str:
        """The build fails in `step` (the image's step name, after "<image>: ") with all `words` in the
        message, and names the build log."""
        expected = (
            "(?s)^"
            + re.escape(f"{NAME}: {step} failed: ")
            + "".join(f"(?=.*{re.escape(word)})" for word in words)
            + r".* \(log: [^)]+\)$"
        )
        with pytest.raises(StepFailed, match=expected) as caught:
            api.build(cfg, [NAME])
        message = str(caught.value)
        for word in (step, *words):
            assert word in message, message
        assert "(log: " in message and Path(message.rsplit("(log: ", 1)[1].rstrip(")")).is_file()
        assert sha256_file(image) == before
        return message

    # A missing playbook is bad input, found when the config is read (no build starts).
    with pytest.raises(ConfigError, match=r"images\.\S+\.prod\.playbooks\.0 = .*nope\.yml.*: no such file"):
        config_with({**layered_image_config(project), "prod": {"playbooks": [str(tmp_path / "nope.yml")]}})

    bad_task = tmp_path / "fail.yml"
    bad_task.write_text(
        "- hosts: all\n  tasks:\n    - name: Deliberately failing task\n"
        "      ansible.builtin.command: /bin/false\n"
    )
    failing(
        config_with({**layered_image_config(project), "prod": {"playbooks": [str(bad_task)]}}),
        "prod: provision (chroot)",
        "Deliberately failing task",
    )

    # A package the distribution does not have: apt-get's own reason, not only its exit status.
    failing(
        config_with({**layered_image_config(project), "prod": {"packages": ["stage4-no-such-package"]}}),
        "prod: provision (chroot)",
        "Install the layer's packages (apt)",
        "Unable to locate package stage4-no-such-package",
    )

    tarball = tmp_path / "src.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(project / "component"), "."], check=True)
    wrong = layered_image_config(project)
    wrong["components"] = {
        "fixture": {**wrong["components"]["fixture"], "source": {"tarball": str(tarball), "sha256": "0" * 64}}
    }
    failing(
        config_with(wrong), "dev: fetch sources (fixture)", "checksum mismatch", f"expected sha256 {'0' * 64}"
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
        config_with(broken),
        "dev: provision (chroot)",
        "component fixture: 'echo configured; echo the-real-cause >&2; exit 3' failed with exit code 3",
        "the-real-cause",
    )
    assert "the-follow-on" not in message and "exit 4" not in message


def test_prod_only_change_rebuilds_only_prod(layered: Layered, project: Path, tmp_path: Path) -> None:
    first = layered.result
    # A changed copy of the project: the shared fixture project stays as the other tests expect it.
    changed_project = tmp_path / "project"
    shutil.copytree(project, changed_project)
    playbook = changed_project / "playbooks/prod.yml"
    playbook.write_text(playbook.read_text().replace("Leave a file", "Leave one file"))
    # same dev inputs by content; in a copy of the layered image's folder
    changed = config_for(layered, tmp_path / "copy", changed_project, prod_text="prod v2")
    (again,) = api.build(changed, [NAME])
    assert again.built == ["prod"]
    assert again.base.identity == first.base.identity
    assert again.dev_manifest["identity"] == first.dev_manifest["identity"]
    assert again.identity != first.identity
    assert json.loads((again.image.parent / "prod.json").read_text())["identity"] == again.identity
    assert read_files(again.image, "/etc/stage4-fixture")["/etc/stage4-fixture"] == "prod v2\n"


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
    layered: Layered, project: Path, tmp_path: Path
) -> None:
    name = NAME
    cfg = config_for(layered, tmp_path / "copy", project)  # its own cache: nothing else runs in `work`
    first = cfg.build.output_dir / name / "prod.qcow2"
    work = cfg.build.cache_dir / "work"
    toml = tmp_path / "stage4.toml"
    data = {
        "build": {"output_dir": str(cfg.build.output_dir), "cache_dir": str(cfg.build.cache_dir)},
        "machine": {"cpus": 2, "memory": "2G", "disk_size": "3G"},
        "images": {name: layered_image_config(project, extra={})},
    }
    data["images"][name]["dev"]["vars"] = {"interrupted": "yes"}  # a new dev identity
    toml.write_text(_toml(data))
    proc = subprocess.Popen(
        [STAGE4, "-c", str(toml), "build", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
    assert attached_to(work) == [], out
    assert sha256_file(first) == json.loads(first.with_suffix(".json").read_text())["image"]["sha256"]

    rerun = subprocess.run(
        [STAGE4, "-c", str(toml), "build", name], capture_output=True, text=True, timeout=1200
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert attached_to(work) == []


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
