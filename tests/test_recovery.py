"""A build killed outright (SIGKILL of the stage4 process alone, as the OOM killer does) leaves nothing for
good: its children die with it, and the next build of the image (or `stage4 clean`) ends what is left,
unmounts, detaches and removes the work directory before it decides what to reuse.

The fast tests attach real loop devices, mounts and processes by hand; the slow ones kill real builds at
each step, with their own cache folder (its package and initramfs caches seeded from the shared one): a
base of its own for the kills in the bootstrap, and a copy of the run's layered image (conftest's
`layered`, its finished steps seeded into this output folder) for the kills in the layers. Each kill
waits for evidence of its step: a mount in /proc/mounts, a process in the process table, a file of the
step (its own: the other worker builds at the same time).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stage4 import attachments, workdirs
from tests.conftest import FIXTURES, STAGE4, Layered, full_matrix, layered_image_config, seed_steps

NAME = "recovery"  # the base killed in its bootstrap
LAYERED = Layered.NAME  # the copy of the layered image killed in its layers
SHARED_CACHE = Path("~/.cache/stage4").expanduser()


# --- what the system shows, read with tools that did not record it ---------------------------------------


def traces(*paths: Path) -> list[str]:
    """Mounts, loop devices and processes that mention or live in one of `paths`."""
    marks = [str(p) for p in paths]
    found = [
        f"mount: {line}"
        for line in Path("/proc/mounts").read_text().splitlines()
        if any(m in line for m in marks)
    ]
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    found += [f"loop: {line}" for line in losetup.splitlines() if any(m in line for m in marks)]
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    for line in ps.splitlines():
        pid, state, args = (line.split(None, 2) + ["", ""])[:3]
        if state.startswith("Z") or int(pid) == os.getpid():
            continue
        roots = []
        for link in ("root", "cwd"):
            try:
                roots.append(os.readlink(f"/proc/{pid}/{link}"))
            except OSError:
                pass
        if any(m in args for m in marks) or any(r.startswith(m) for r in roots for m in marks):
            found.append(f"process: {line.strip()} (root/cwd {roots})")
    return found


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, log: Callable[[], str] = str
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f} s\n{log()}")


def mounted_below(path: Path, suffix: str = "") -> list[str]:
    return [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(str(path)) and line.split()[1].endswith(suffix)
    ]


def processes(pattern: str) -> list[str]:
    result = subprocess.run(["pgrep", "-af", pattern], check=False, capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


# --- fast: attachments made by hand ---------------------------------------------------------------------

# A "build" in a child process: a 32 MiB ext4 file on a loop device mounted in its work folder and a
# process working in it, everything recorded the way the Runner records it. The child then stops
# (SIGKILL from the test) or waits while it holds the image's build lock.
ATTACH_SCRIPT = textwrap.dedent("""\
    import os, subprocess, sys, time
    from pathlib import Path
    from stage4 import attachments, workdirs
    cache, image, hold = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "hold"
    work = cache / "work" / f"{image}-0123456789abcdef"
    attach = work / "attach"
    attach.mkdir(parents=True)
    disk = attach / "disk.raw"
    subprocess.run(["truncate", "-s", "32M", disk], check=True)
    subprocess.run(["mkfs.ext4", "-q", disk], check=True)
    attachments.note(attach, "open")
    device = subprocess.run(["losetup", "--find", "--show", disk], check=True, capture_output=True,
                            text=True).stdout.strip()
    attachments.note(attach, "loop", device=device, backing=str(disk))
    root = attach / "root"
    root.mkdir()
    attachments.note(attach, "mount", target=str(root))
    subprocess.run(["mount", device, root], check=True)
    (root / "payload").write_bytes(os.urandom(4 << 20))
    worker = subprocess.Popen(["sleep", "600"], cwd=root, start_new_session=True)
    attachments.note_process(attach, worker.pid, worker.args)
    lock = open(workdirs.lock_file(cache, image), "a")
    if hold:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX)
    (cache / "work" / f"{image}.owner.json").write_text(
        __import__("json").dumps({**attachments.Owner.me().to_record(), "output_dir": str(cache / "out")}))
    print(device, flush=True)
    time.sleep(600)
    """)


def start_attached(cache: Path, image: str, hold: bool) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen(
        [sys.executable, "-c", ATTACH_SCRIPT, str(cache), image, "hold" if hold else "-"],
        stdout=subprocess.PIPE,
        text=True,
    )
    device = child.stdout.readline().strip()
    assert device.startswith("/dev/loop"), f"the attaching child failed (exit {child.poll()})"
    return child, device


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_owner_identity_tells_a_reused_pid_apart() -> None:
    me = attachments.Owner.me()
    assert me.alive()
    assert not attachments.Owner(me.pid, me.start + 1, me.boot).alive()  # same PID, a later process
    assert not attachments.Owner(me.pid, me.start, "another-boot").alive()
    finished = subprocess.Popen(["sleep", "60"])
    start = attachments.process_start(finished.pid)
    assert start is not None and attachments.Owner(finished.pid, start, me.boot).alive()
    finished.kill()
    finished.wait()
    assert not attachments.Owner(finished.pid, start, me.boot).alive()


def test_clean_releases_what_a_killed_build_left(cache: Path) -> None:
    child, device = start_attached(cache, NAME, hold=False)
    work = cache / "work" / f"{NAME}-0123456789abcdef"
    assert traces(work)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert any("sleep" in t for t in traces(work)), "the worker should outlive its (unguarded) owner"

    result = subprocess.run(
        [STAGE4, "-c", str(project_file(cache.parent, cache)), "clean", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["busy"] == []
    (removed,) = report["removed"]
    assert removed["path"] == str(work) and removed["state"] == workdirs.KILLED
    assert 4 << 20 <= removed["bytes"] <= report["freed_bytes"]
    assert traces(work) == []
    assert device not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert not work.exists()
    assert not (cache / "work" / f"{NAME}.owner.json").exists()


def test_clean_removes_a_work_dir_kept_for_resuming(cache: Path) -> None:
    # What Ctrl-C leaves of a base build (no owner, closed scopes): a rerun resumes it; clean frees it.
    work = cache / "work" / f"{NAME}-0123456789abcdef"
    (work / "rootfs").mkdir(parents=True)
    (work / "rootfs" / "file").write_bytes(os.urandom(1 << 20))
    (work / "rootfs.done").touch()
    with attachments.scope(work):
        pass
    result = subprocess.run(
        [STAGE4, "-c", str(project_file(cache.parent, cache)), "clean", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (removed,) = json.loads(result.stdout)["removed"]
    assert removed["state"] == workdirs.RESUMABLE and removed["bytes"] >= 1 << 20
    assert not work.exists()


def test_clean_cache_removes_the_caches_kept_between_builds(cache: Path) -> None:
    # The package cache and a base's kept root tree (what a package-list change starts from) go; the
    # image's work lock stays.
    kept = {"apt/debian-12/tree_2.1.0-1_amd64.deb": 1 << 20, "trees/debian-12-0123456789abcdef/tree.json": 10}
    for relative, size in kept.items():
        (cache / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache / relative).write_bytes(os.urandom(size))
    (cache / "work").mkdir()
    lock = workdirs.lock_file(cache, NAME)
    lock.touch()
    result = subprocess.run(
        [STAGE4, "-c", str(project_file(cache.parent, cache)), "clean", "--cache", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    removed = {Path(r["path"]).name: r for r in json.loads(result.stdout)["removed"]}
    assert set(removed) == {"apt", "trees"}, removed
    assert removed["apt"]["bytes"] >= 1 << 20
    assert not (cache / "apt").exists() and not (cache / "trees").exists() and lock.exists()


@pytest.mark.parametrize("hold_lock", [True, False], ids=["holds-the-lock", "attached-elsewhere"])
def test_clean_leaves_a_live_build_alone(cache: Path, hold_lock: bool) -> None:
    # The build lock is the first guard; a live owner's open scope the second (a build that holds no lock).
    child, _device = start_attached(cache, NAME, hold=hold_lock)
    work = cache / "work" / f"{NAME}-0123456789abcdef"
    try:
        before = traces(work)
        result = subprocess.run(
            [STAGE4, "-c", str(project_file(cache.parent, cache)), "clean", NAME],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"{NAME}: a build is running; left alone" in result.stdout
        assert "freed 0 bytes" in result.stdout
        assert traces(work) == before and (work / "attach/root/payload").is_file()
    finally:
        child.kill()
        child.wait()
        subprocess.run(
            [STAGE4, "-c", str(project_file(cache.parent, cache)), "clean", NAME],
            check=False,
            capture_output=True,
        )
    assert traces(work) == [] and not work.exists()


def test_children_die_with_a_killed_stage4(tmp_path: Path) -> None:
    """The guardian ends the command's whole process group, PR_SET_PDEATHSIG the command itself."""
    marker = tmp_path / "group-marker"
    script = textwrap.dedent(f"""\
        import time
        from stage4.runner import Runner
        with Runner().background(["sh", "-c", "sleep 600 & sleep 600 & echo started; wait", "{marker}"],
                                 step="test") as process:
            while "started" not in list(process.lines):
                time.sleep(0.05)
            print("ready", flush=True)
            time.sleep(600)
        """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    # The command leads its own group; a child sh forked for `sleep 600 &` that has not yet exec'd sleep
    # (a loaded machine) shows the same command line, in that group.
    (command,) = [
        line
        for line in processes(str(marker))
        if " sh -c " in f" {line.split(None, 1)[1]}" and leads_group(int(line.split()[0]))
    ]
    group = int(command.split()[0])
    assert group_members(group) >= 3  # sh and its two sleeps
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    wait_until(lambda: group_members(group) == 0, 30, f"end of process group {group}")


def leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def group_members(group: int) -> int:
    ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return sum(
        1 for line in ps.splitlines() if int(line.split()[0]) == group and not line.split()[1].startswith("Z")
    )


# --- slow: real builds killed at each step -------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def project_file(root: Path, cache: Path, images: dict[str, dict] | None = None) -> Path:
    lines = [
        "[build]",
        f"output_dir = {toml_value(str(root / 'out'))}",
        f"cache_dir = {toml_value(str(cache))}",
        "[machine]",
        'disk_size = "3G"',
    ]
    for name, image in (images or {}).items():
        lines.append(f'[images."{name}"]')
        lines += [f"{key} = {toml_value(value)}" for key, value in image.items()]
    path = root / "stage4.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Build:
    """`stage4 build` in the background; its output collected in a file."""

    def __init__(self, env: Env, image: str, *args: str):
        self.env = env
        self.output = env.root / f"build-{time.monotonic_ns()}.out"
        with self.output.open("w") as handle:
            self.popen = subprocess.Popen(
                [STAGE4, "-c", str(env.toml), "build", image, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 900) -> object:
        def seen() -> object:
            assert self.popen.poll() is None, (
                f"the build ended (exit {self.popen.returncode}) before {what}:\n{self.text()}"
            )
            return condition()

        return wait_until(seen, timeout, what, self.text)

    def kill(self) -> None:
        """SIGKILL to the stage4 process alone, as the OOM killer does; its children are not signalled."""
        self.env.loops = [
            line.split(":")[0]
            for line in subprocess.run(
                ["losetup", "-a"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if str(self.env.cache) in line
        ]
        os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=30) == -signal.SIGKILL


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.cache = root / "cache"
        self.out = root / "out"
        self.loops: list[str] = []  # the killed build's loop devices
        for name in ("playbooks", "dracut", "component"):
            shutil.copytree(FIXTURES / name, root / name)
        for name in ("apt", "initramfs"):  # downloads and initramfs builds only; no work folders
            if (SHARED_CACHE / name).is_dir():
                try:
                    shutil.copytree(SHARED_CACHE / name, self.cache / name, dirs_exist_ok=True)
                except shutil.Error:
                    pass  # a file another build was writing: only a slower first bootstrap
        # The layered image from a copy of the fixtures: the same content, so the same identities as the
        # run's layered image, whose finished steps `seeded_env` copies in.
        images = {NAME: {"distribution": "debian-12"}, LAYERED: layered_image_config(root)}
        self.toml = project_file(root, self.cache, images)

    @property
    def work(self) -> Path:
        return self.cache / "work"

    def after_kill(self) -> None:
        """Within seconds of the kill no process of the build is left (nothing keeps writing a layer)."""
        wait_until(
            lambda: not [t for t in traces(self.cache, self.out) if t.startswith("process")],
            45,
            "end of the killed build's processes",
            lambda: "\n".join(traces(self.cache, self.out)),
        )

    def rebuild_and_check(self, image: str) -> subprocess.CompletedProcess:
        """The next plain build of `image` succeeds and nothing of the killed one is left; its last step's
        image passes inspect."""
        result = subprocess.run(
            [STAGE4, "-c", str(self.toml), "build", image],
            check=False,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert traces(self.cache, self.out) == []
        for device in self.loops:  # once its FUSE export is gone, a loop's backing file is shown as "/"
            back = subprocess.run(
                ["losetup", "-n", "-l", "-O", "BACK-FILE", device],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            assert not back or back != "/" and str(self.cache) not in back, (
                f"{device} still attached ({back})"
            )
        # The locks stay; so does the empty parent of the layers' work folders after a finished build.
        left = [
            p
            for p in self.work.iterdir()
            if p.suffix != ".lock" and not (p.is_dir() and not any(p.iterdir()))
        ]
        assert left == []
        partial = [p for p in (self.out / image).iterdir() if ".partial-" in p.name or ".old-" in p.name]
        assert partial == []
        last = "prod.qcow2" if image == LAYERED else "base.qcow2"
        inspect = subprocess.run(
            [STAGE4, "inspect", str(self.out / image / last)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert inspect.returncode == 0, inspect.stdout[-2000:] + inspect.stderr[-2000:]
        return result


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    if not all(shutil.which(tool) for tool in ("qemu-storage-daemon", "losetup", "mmdebstrap")):
        pytest.fail("missing tools: run ./install.sh")
    return Env(tmp_path_factory.mktemp("recovery"))


@pytest.fixture
def seeded_env(env: Env, layered: Layered) -> Env:
    """The env with the run's layered image (base, dev, prod) in its output folder."""
    if not (env.out / LAYERED / "prod.json").is_file():
        seed_steps(layered.image_dir, env.out / LAYERED, ("base", "dev", "prod"))
    return env


def base_work(env: Env, image: str = NAME) -> list[Path]:
    return [p for p in env.work.glob(f"{image}-*") if p.is_dir() and "-layers-" not in p.name]


@pytest.mark.slow
def test_clean_frees_a_build_killed_in_bootstrap(env: Env) -> None:
    build = Build(env, NAME)
    build.wait_for(lambda: mounted_below(env.work, "/proc"), "mmdebstrap's /proc mount in the chroot", 300)
    build.kill()
    env.after_kill()
    (stale,) = base_work(env)
    result = subprocess.run(
        [STAGE4, "-c", str(env.toml), "clean", NAME], check=False, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"removed {stale} ({workdirs.KILLED})" in result.stdout
    freed = int(result.stdout.split("freed ")[1].split()[0])
    assert freed > 1 << 20
    assert traces(env.cache, env.out) == [] and not stale.exists()


@pytest.mark.slow
def test_kill_in_bootstrap(env: Env) -> None:
    build = Build(env, NAME)
    build.wait_for(lambda: mounted_below(env.work, "/proc"), "mmdebstrap's /proc mount in the chroot", 300)
    build.kill()
    env.after_kill()
    result = env.rebuild_and_check(NAME)  # a whole bootstrap, after the killed one
    assert "released what a killed build left" in result.stderr


@pytest.mark.slow
@full_matrix
def test_kill_in_disk_assembly(seeded_env: Env) -> None:
    # The interrupted `--rebuild base` of the report: the rerun reuses the old base but removes the
    # work folder.
    env = seeded_env
    build = Build(env, LAYERED, "--rebuild", "base")
    build.wait_for(
        lambda: [p for p in base_work(env, LAYERED) if (p / "disk.raw").exists()], "the GPT disk file", 900
    )
    build.kill()
    env.after_kill()
    result = env.rebuild_and_check(LAYERED)
    assert "released what a killed build left" in result.stderr
    assert "is up to date, reusing" in result.stderr


def provisioning(env: Env, layer: str) -> Callable[[], object]:
    """The chroot is ready (its /proc mounted) and Ansible runs."""
    return lambda: (
        mounted_below(env.work, f"/{layer}/attach/root/proc")
        and processes(f"ansible-playbook.*{env.work}/.*/{layer}/ansible")
    )


@pytest.mark.slow
def test_kill_in_dev_provisioning(seeded_env: Env) -> None:
    # The report's case: a plain rerun reuses the layers, and must still release the killed run's attachments.
    env = seeded_env
    build = Build(env, LAYERED, "--rebuild", "dev")
    build.wait_for(provisioning(env, "dev"), "Ansible in the dev chroot", 900)
    build.kill()
    env.after_kill()
    assert mounted_below(env.work), "the layer's mounts stay until the next build"
    result = env.rebuild_and_check(LAYERED)
    assert "released what a killed build left" in result.stderr
    assert "dev" in result.stderr and "is up to date, reusing" in result.stderr


@pytest.mark.slow
@full_matrix
def test_kill_in_prod_provisioning(seeded_env: Env) -> None:
    env = seeded_env
    build = Build(env, LAYERED, "--rebuild", "prod")
    build.wait_for(provisioning(env, "prod"), "Ansible in the prod chroot", 900)
    build.kill()
    env.after_kill()
    result = env.rebuild_and_check(LAYERED)
    assert "released what a killed build left" in result.stderr


@pytest.mark.slow
def test_kill_in_flatten(seeded_env: Env) -> None:
    env = seeded_env
    build = Build(env, LAYERED, "--rebuild", "prod")
    build.wait_for(
        lambda: processes(rf"qemu-img convert .*{env.out}/.*\.prod\.qcow2\.partial-"),
        "qemu-img flattening",
        1200,
    )
    build.kill()
    env.after_kill()
    result = env.rebuild_and_check(LAYERED)
    assert "released what a killed build left" in result.stderr
