"""Interrupting stage4: Ctrl-C or SIGTERM at any step leaves no partial image, no mount, no qemu,
and a rerun continues from what was finished."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stage4 import api, config
from stage4.fsutil import mounts_below
from tests.conftest import STAGE4, BuiltImage, session_cache

pytestmark = pytest.mark.slow


class Stage4Process:
    """`stage4 ...` in the background, its output lines collected as they come."""

    def __init__(self, *args: str):
        self.popen = subprocess.Popen(
            [STAGE4, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)
            self._queue.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if text in self._queue.get(timeout=1):
                    return
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
        pytest.fail(f"never saw {text!r}; output:\n{''.join(self.lines)[-3000:]}")

    def interrupt(self, signum: int) -> int:
        self.popen.send_signal(signum)
        return self.popen.wait(timeout=120)


def leftovers(output: Path) -> list[Path]:
    return [p for p in output.rglob("*") if p.is_file() and (p.suffix == ".qcow2" or ".partial" in p.name)]


def processes_mentioning(text: str) -> list[str]:
    result = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


def test_interrupted_build_leaves_nothing_and_resumes(tmp_path: Path) -> None:
    cache = session_cache()
    toml = tmp_path / "stage4.toml"
    toml.write_text(
        f'[build]\noutput_dir = "{tmp_path}/out"\ncache_dir = "{cache}"\n'
        '[machine]\ndisk_size = "3G"\n[images.stopme]\ndistribution = "debian-12"\n'
        'packages = ["less"]\n',
        encoding="utf-8",
    )
    work_root = cache / "work"

    # 1. Ctrl-C while mmdebstrap has the chroot's /proc, /sys and /dev mounted.
    build = Stage4Process("-c", str(toml), "build")
    build.wait_for("bootstrap", timeout=60)
    deadline = time.monotonic() + 180
    while not [m for m in mounts_below(work_root) if "/stopme-" in m]:
        assert time.monotonic() < deadline, "mmdebstrap never mounted /proc in its chroot"
        time.sleep(0.2)
    assert build.interrupt(signal.SIGINT) == 130, "".join(build.lines)[-2000:]
    assert build.lines[-1].strip() == "stage4: interrupted; partial results were removed", build.lines[-3:]
    assert not [m for m in mounts_below(work_root) if "/stopme-" in m]
    assert not processes_mentioning("stopme-")
    assert leftovers(tmp_path / "out") == []

    # 2. SIGTERM during the disk assembly, after the bootstrap finished.
    build = Stage4Process("-c", str(toml), "build")
    build.wait_for("assemble GPT disk", timeout=600)
    assert build.interrupt(signal.SIGTERM) == 130, "".join(build.lines)[-2000:]
    assert build.lines[-1].strip() == "stage4: interrupted; partial results were removed", build.lines[-3:]
    assert not [m for m in mounts_below(work_root) if "/stopme-" in m]
    assert leftovers(tmp_path / "out") == []

    # 3. The rerun continues: no second bootstrap, and the image is complete.
    rerun = subprocess.run([STAGE4, "-c", str(toml), "build"], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "bootstrap" not in rerun.stderr
    assert "assemble GPT disk" in rerun.stderr
    image = tmp_path / "out" / "stopme" / "base.qcow2"
    report = api.inspect(image)
    assert report.passed, report.problems()
    cfg = config.load(toml)
    assert not list((cfg.build.cache_dir / "work").glob("stopme-*"))


def test_sigterm_during_boot_leaves_no_qemu(base_image: BuiltImage, tmp_path: Path) -> None:
    # A name of its own for the base (a hard link), so that the qemu looked for is this boot's, not one
    # the other worker runs.
    image = tmp_path / "sigterm" / "base.qcow2"
    image.parent.mkdir()
    os.link(base_image.path, image)
    shutil.copyfile(base_image.path.with_suffix(".json"), image.with_suffix(".json"))
    serial = tmp_path / "serial.log"
    boot = Stage4Process("boot", "--via", "kernel", "--log", str(serial), str(image))
    boot.wait_for("boot base.qcow2", timeout=120)
    deadline = time.monotonic() + 60
    while (not serial.exists() or serial.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert serial.stat().st_size > 0, "qemu printed nothing"
    assert processes_mentioning(f"file={image}")
    assert boot.interrupt(signal.SIGTERM) == 130
    assert not processes_mentioning(f"file={image}")
