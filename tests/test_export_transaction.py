"""`stage4 export` is one transaction: real failures (full and inode-less tmpfs, read-only bind mounts, a
missing pid file, a dead server, a crash mid-commit) publish nothing, `stage4 revisions` shows nothing new,
and the next export gets the next revision. Also: the active revision survives prune; a boot directory
inside the store must be hidden; bad --server values are refused.

Mounts need root; every mount is undone in the fixture's finally.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stage4.errors import InputError, Stage4Error
from stage4.export.publish import prepare, publish
from stage4.export.revisions import prune
from stage4.runner import Runner
from tests.transports import DyingServerTransport, LocalShellTransport

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
STAGE4 = [sys.executable, "-m", "stage4"]
NAME = "sub/dir/img.qcow2"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounts tmpfs and bind mounts: run the tests as root"
)


def visible(store: Path) -> list[str]:
    """What dnbd3-server's scan can see."""
    return sorted(
        str(p.relative_to(store))
        for p in store.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store).parts)
    )


def everything(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def one_line(message: str) -> str:
    assert "\n" not in message and "Traceback" not in message, message
    return message


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STAGE4, *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def cli_error(result: subprocess.CompletedProcess, code: int) -> str:
    """The one error line of a failed CLI run."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("stage4: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def listed(store: Path, name: str = NAME) -> list[int]:
    """The revisions `stage4 revisions` shows."""
    result = cli("revisions", name, "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    return [row["rid"] for row in json.loads(result.stdout)]


@pytest.fixture
def mounts(tmp_path):
    """mount(kind, target, options): tmpfs or a read-only bind mount; all unmounted at the end."""
    made: list[Path] = []

    def mount(target: Path, options: str = "", *, bind_ro: Path | None = None) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        if bind_ro is not None:
            subprocess.run(["mount", "--bind", bind_ro, target], check=True)
            made.append(target)
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
        else:
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", target], check=True)
            made.append(target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(made):
            if subprocess.run(["umount", target], check=False, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "image.img"
    path.write_bytes(os.urandom(16 * MiB + 5000))
    return path


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "small.img"
    path.write_bytes(os.urandom(MiB))
    return path


@pytest.fixture
def boot(tmp_path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(100_000))
    initrd.write_bytes(os.urandom(500_000))
    return kernel, initrd


def export(image: Path, store: Path | str, name: str = NAME, **kwargs):
    kwargs.setdefault("boot_files", False)
    return publish(image, store, name, check_image=False, **kwargs)


def test_store_without_space_publishes_nothing(tmp_path, mounts, image, small):
    store = mounts(tmp_path / "store", "size=24m")
    assert export(image, store).rid == 1
    before = everything(store)
    for name in (NAME, "new/deeper/img.qcow2"):
        where = store / name.rsplit("/", 1)[0]
        with pytest.raises(
            Stage4Error,
            match=re.escape(f"cannot write the image to {where}: No space left on device; nothing published"),
        ) as info:
            export(image, store, name)
        message = one_line(str(info.value))
        assert "No space left on device" in message and "nothing published" in message
        assert everything(store) == before, "no temporary, no empty directory is left"
    assert listed(store) == [1]
    assert export(small, store).rid == 2
    assert listed(store) == [1, 2]


def test_boot_dir_without_inodes_publishes_nothing(tmp_path, mounts, image, boot):
    store, boot_dir = tmp_path / "store", mounts(tmp_path / "boot", "size=8m,nr_inodes=3")
    store.mkdir()
    # room for the kernel and initramfs temporaries, none for the config: the reported bug left .r1 and
    # .r1.crc visible with no config.r1 and no record
    with pytest.raises(
        Stage4Error,
        match=re.escape(f"cannot write the config to {boot_dir}: No space left on device; nothing published"),
    ) as info:
        export(image, store, kernel=boot[0], initrd=boot[1], boot_files=True, boot_dir=boot_dir)
    message = one_line(str(info.value))
    assert "No space left on device" in message and str(boot_dir) in message
    assert visible(store) == [] and everything(boot_dir) == []
    assert listed(store) == []
    subprocess.run(["mount", "-o", "remount,nr_inodes=100", boot_dir], check=True)
    pub = export(image, store, kernel=boot[0], initrd=boot[1], boot_files=True, boot_dir=boot_dir)
    assert pub.rid == 1 and listed(store) == [1]
    assert sorted(everything(boot_dir)) == ["config.r1", "initrd.r1", "ipxe.r1", "kernel.r1"]


def test_boot_dir_without_space_for_the_initramfs_publishes_nothing(tmp_path, mounts, image, boot):
    """ENOSPC in os.sendfile (the initramfs copy): one line, nothing published, no directory left."""
    store, boot_root = tmp_path / "store", mounts(tmp_path / "boot", "size=256k")
    store.mkdir()
    boot_dir = boot_root / "netboot/stage4"
    with pytest.raises(
        Stage4Error,
        match=re.escape(f"cannot write the initrd to {boot_dir}: No space left on device; nothing published"),
    ) as info:
        export(image, store, kernel=boot[0], initrd=boot[1], boot_files=True, boot_dir=boot_dir)
    assert "cannot write the initrd" in one_line(str(info.value))
    assert everything(boot_root) == [] and everything(store) == [".stage4.lock"]
    assert listed(store) == []


def test_read_only_store_and_boot_dir_are_one_line_errors(tmp_path, mounts, image, small):
    source = tmp_path / "source"
    source.mkdir()
    assert export(small, source).rid == 1
    before = everything(source)
    store = mounts(tmp_path / "ro", bind_ro=source)
    line = cli_error(cli("export", str(image), "--store", str(store), "--name", NAME), 2)
    assert f"store {store}: read-only file system" in line
    with pytest.raises(InputError, match="read-only file system"):
        export(image, store)
    writable = tmp_path / "writable"
    writable.mkdir()
    line = cli_error(
        cli(
            "export", str(image), "--store", str(writable), "--name", NAME, "--boot-dir", str(store / "boot")
        ),
        2,
    )
    assert "boot directory" in line and "read-only file system" in line
    assert everything(source) == before and everything(writable) == []
    assert listed(store) == [1]


def test_missing_pid_file_fails_before_anything_is_published(tmp_path, image, small):
    store = tmp_path / "store"
    store.mkdir()
    assert export(small, store).rid == 1
    line = cli_error(
        cli(
            "export",
            str(image),
            "--store",
            str(store),
            "--name",
            NAME,
            "--reload-pidfile",
            "/nonexistent.pid",
        ),
        2,
    )
    assert "pid file /nonexistent.pid" in line
    assert listed(store) == [1] and visible(store) == [f"{NAME}.r1", f"{NAME}.r1.crc"]
    assert export(small, store).rid == 2


def test_dead_server_fails_before_anything_is_published(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{dead.pid}\n")
    line = cli_error(
        cli("export", str(image), "--store", str(store), "--name", NAME, "--reload-pidfile", str(pidfile)), 1
    )
    assert f"no process {dead.pid}" in line
    assert listed(store) == [] and visible(store) == []
    assert export(image, store).rid == 1


def test_server_gone_after_the_link_withdraws_the_revision(tmp_path, image, boot):
    """The server dies between the checks and the SIGHUP: the revision was visible for a moment and is
    withdrawn again, image first; the active config is the previous one again."""
    store = tmp_path / "store"
    store.mkdir()
    kwargs = {
        "kernel": boot[0],
        "initrd": boot[1],
        "boot_files": True,
        "activate": True,
        "check_image": False,
    }
    assert publish(image, store, NAME, **kwargs).rid == 1
    meta = store / ".stage4" / NAME
    active = (meta / "config").read_text()
    server = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{server.pid}\n")
    planned = prepare(image, store, NAME, reload_pidfile=pidfile, **kwargs)
    server.kill()
    server.wait()
    with pytest.raises(
        Stage4Error,
        match=re.escape(
            f"server reload: no process {server.pid} (from {pidfile}); revision 2 of {NAME} withdrawn; "
            "nothing published"
        ),
    ) as info:
        planned.run()
    message = one_line(str(info.value))
    assert f"no process {server.pid}" in message and f"revision 2 of {NAME} withdrawn" in message
    assert visible(store) == [f"{NAME}.r1", f"{NAME}.r1.crc"]
    assert (meta / "config").read_text() == active
    assert not [p for p in meta.iterdir() if ".r2" in p.name or p.name.endswith(".part")]
    assert listed(store) == [1]
    assert publish(image, store, NAME, **kwargs).rid == 2


def test_crash_mid_commit_is_reported_and_repaired(tmp_path, image, boot):
    """SIGKILL after the record and the kernel were linked (a real crash, injected from outside): the
    revision is not listed, `revisions --check` reports it, `--repair` withdraws it."""
    store = tmp_path / "store"
    store.mkdir()
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from stage4.export import tempfiles
        from stage4.export.publish import publish

        real, calls = tempfiles.link_exclusive, []

        def crash_on_third(source, target, what):
            calls.append(target)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(source, target, what)

        tempfiles.link_exclusive = crash_on_third
        publish(Path({str(image)!r}), {str(store)!r}, {NAME!r}, check_image=False,
                kernel=Path({str(boot[0])!r}), initrd=Path({str(boot[1])!r}))
    """)
    child = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, timeout=120)
    assert child.returncode == -signal.SIGKILL
    meta = store / ".stage4" / NAME
    linked = sorted(p.name for p in meta.iterdir() if not p.name.startswith("."))
    assert linked == ["kernel.r1", "publication.r1.json"]
    assert listed(store) == []
    result = cli("revisions", NAME, "--store", str(store), "--check")
    assert result.returncode == 1 and "r1" in result.stdout and "INCOMPLETE" in result.stdout, result.stdout
    result = cli("revisions", NAME, "--store", str(store), "--repair")
    assert result.returncode == 0 and "withdrew r1" in result.stdout, result.stderr
    assert not [p for p in meta.iterdir() if not p.name.startswith(".")]
    assert cli("revisions", NAME, "--store", str(store), "--check").returncode == 0
    assert export(image, store).rid == 1


def test_prune_keeps_the_active_revision(tmp_path, small):
    store = tmp_path / "store"
    store.mkdir()
    for rid in range(1, 6):
        assert export(small, store, activate=rid == 4).rid == rid
    assert "SLX_DNBD3_RID='4'" in (store / ".stage4" / NAME / "config").read_text()
    result = cli("prune", NAME, "--store", str(store), "--keep", "1")
    assert result.returncode == 0 and "removed r1, r2, r3" in result.stdout, result.stdout + result.stderr
    assert listed(store) == [4, 5]
    assert prune(store, NAME, 1) == []


@pytest.mark.parametrize("server", ['a"b', "", "a'b", "host:0"])
def test_bad_servers_are_refused(tmp_path, image, server):
    store = tmp_path / "store"
    store.mkdir()
    line = cli_error(cli("export", str(image), "--store", str(store), "--name", NAME, "--server", server), 2)
    assert "server" in line
    assert everything(store) == []


def test_boot_dir_inside_the_store_must_be_hidden(tmp_path, image, boot):
    store = tmp_path / "store"
    store.mkdir()
    for inside in (store / "netboot", store, store / "a/b"):
        line = cli_error(
            cli("export", str(image), "--store", str(store), "--name", NAME, "--boot-dir", str(inside)), 2
        )
        assert "visible to dnbd3-server" in line and "kernel.r<RID>" in line
    assert everything(store) == []
    hidden = store / "netboot/.boot"
    pub = export(image, store, kernel=boot[0], initrd=boot[1], boot_files=True, boot_dir=hidden)
    assert pub.rid == 1 and visible(store) == [f"{NAME}.r1", f"{NAME}.r1.crc"]
    assert (hidden / "kernel.r1").is_file() and listed(store) == [1]
    outside = tmp_path / "http"
    assert export(image, store, kernel=boot[0], initrd=boot[1], boot_files=True, boot_dir=outside).rid == 2


def test_remote_store_script_is_one_transaction_too(tmp_path, mounts, image, boot):
    store = tmp_path / "remote"
    store.mkdir()
    runner = Runner()
    kwargs = {"check_image": False, "runner": runner, "kernel": boot[0], "initrd": boot[1], "activate": True}
    assert publish(image, f"host:{store}", NAME, transport=LocalShellTransport(runner), **kwargs).rid == 1
    meta = store / ".stage4" / NAME
    active = (meta / "config").read_text()
    before = everything(store)
    with pytest.raises(InputError, match="pid file /nonexistent.pid"):
        publish(
            image,
            f"host:{store}",
            NAME,
            transport=LocalShellTransport(runner),
            reload_pidfile="/nonexistent.pid",
            **kwargs,
        )
    assert everything(store) == before
    server = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{server.pid}\n")
    with pytest.raises(
        Stage4Error,
        match=re.escape(
            f"host:{store}: server reload: no process '{server.pid}' (from {pidfile}); the revision was "
            "withdrawn; nothing published"
        ),
    ) as info:
        publish(
            image,
            f"host:{store}",
            NAME,
            transport=DyingServerTransport(runner, server),
            reload_pidfile=pidfile,
            **kwargs,
        )
    message = one_line(str(info.value))
    assert "no process" in message and "withdrawn" in message
    assert everything(store) == before and (meta / "config").read_text() == active
    boot_dir = mounts(tmp_path / "boot", "size=8m,nr_inodes=3")
    with pytest.raises(  # no inode for the uploaded config's temporary
        Stage4Error,
        match=rf"^upload config failed: cp exited with 1: .*'{re.escape(str(boot_dir))}/\.config\.stage4-"
        r"[^']+\.part': No space left on device; nothing published$",
    ) as info:
        publish(
            image,
            f"host:{store}",
            NAME,
            transport=LocalShellTransport(runner),
            boot_dir=str(boot_dir),
            **kwargs,
        )
    assert "nothing published" in one_line(str(info.value))
    assert everything(store) == before and everything(boot_dir) == []
    assert publish(image, f"host:{store}", NAME, transport=LocalShellTransport(runner), **kwargs).rid == 2


def test_remote_store_numbers_past_zero_and_zero_padded_revision_files(tmp_path, image, boot):
    # A store host's script reads every revision number it finds; `expr 0 + 0` exits 1, which once
    # ended the commit without a word under `set -e`.
    store = tmp_path / "remote"
    (store / "sub/dir").mkdir(parents=True)
    for stray in ("img.qcow2.r0", "img.qcow2.r007"):
        (store / "sub/dir" / stray).write_bytes(b"")
    runner = Runner()
    published = publish(
        image,
        f"host:{store}",
        NAME,
        transport=LocalShellTransport(runner),
        runner=runner,
        check_image=False,
        kernel=boot[0],
        initrd=boot[1],
    )
    assert published.rid == 8
