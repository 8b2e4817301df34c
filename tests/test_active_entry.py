"""The active entry `<boot-dir>/ipxe`: what `stage4 export --activate` writes for clients that follow the
active revision, in a local store and through the remote store script (run by the local sh), and how
`stage4 netboot --active` finds what such a client boots. No VM here: test_netboot.py boots it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stage4.boot import netboot
from stage4.errors import InputError, Stage4Error
from stage4.export.publish import prepare, publish
from stage4.export.revisions import prune
from stage4.runner import Runner
from tests.transports import DyingServerTransport, LocalShellTransport

NAME = "sub/img.qcow2"
ROOT = Path(__file__).resolve().parents[1]


def digests(directory: Path) -> dict[str, tuple[int, str]]:
    """Inode and sha256 of every visible file in `directory`."""
    return {
        p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(params=["local", "remote"])
def store(request, tmp_path) -> dict:
    """An empty store and how to export into it: directly, or through remote_commit.sh. `dying`: a
    process named as the server by a pid file, killed after the checks and before the SIGHUP."""
    root = tmp_path / "store"
    root.mkdir()
    runner = Runner()

    def export(image: Path, dying: subprocess.Popen | None = None, **options):
        options.setdefault("boot_files", "kernel" in options)
        options.update(check_image=False, runner=runner)
        if dying is not None:
            options["reload_pidfile"] = tmp_path / "server.pid"
            options["reload_pidfile"].write_text(f"{dying.pid}\n")
        if request.param == "remote":
            transport = DyingServerTransport(runner, dying) if dying else LocalShellTransport(runner)
            return publish(image, f"host:{root}", NAME, transport=transport, **options)
        planned = prepare(image, root, NAME, **options)
        if dying is not None:
            dying.kill()
            dying.wait()
        return planned.run()

    return {"root": root, "export": export, "boot": root / ".stage4" / NAME, "tmp": tmp_path}


def files(tmp: Path, tag: str) -> tuple[Path, Path, Path]:
    """An image, a kernel and an initramfs whose bytes differ per tag."""
    paths = []
    for kind, size in (("image", 40_000), ("kernel", 3_000), ("initrd", 5_000)):
        path = tmp / f"{kind}-{tag}"
        path.write_bytes(hashlib.sha256(f"{kind}-{tag}".encode()).digest() * (size // 32))
        paths.append(path)
    return paths[0], paths[1], paths[2]


def entry_of(boot: Path) -> netboot.IpxeEntry:
    return netboot.parse_ipxe((boot / "ipxe").read_text(), "ipxe")


def test_activation_writes_an_entry_that_follows_config(store: dict) -> None:
    """--activate writes `ipxe` beside `config`: the active revision's kernel and initramfs, no revision on
    the command line; an export without --activate changes neither; the next activation replaces both
    (new files, by rename) and never touches a published file."""
    export, boot, tmp = store["export"], store["boot"], store["tmp"]
    image1, kernel1, initrd1 = files(tmp, "1")
    assert export(image1, kernel=kernel1, initrd=initrd1, activate=True).rid == 1
    entry = entry_of(boot)
    assert entry.kernel_url == "http://${slxsrv}/${slxbase}/kernel.r1"
    assert entry.initrd_url == "http://${slxsrv}/${slxbase}/initrd.r1"
    assert entry.kernel_args == ["initrd=initrd.r1", "slxsrv=${slxsrv}", "slxbase=${slxbase}"]
    assert "SLX_DNBD3_RID='1'" in (boot / "config").read_text()
    assert "SLX_DNBD3_RID=1" in (boot / "ipxe.r1").read_text()  # the revision's own entry still pins it
    active = netboot.find_active(store["root"], NAME, None)
    assert (active.rid, active.config, active.ipxe) == (1, boot / "config", boot / "ipxe")
    assert active.kernel.read_bytes() == kernel1.read_bytes()
    assert active.initrd.read_bytes() == initrd1.read_bytes()

    image2, kernel2, initrd2 = files(tmp, "2")
    before = digests(boot)
    assert export(image2, kernel=kernel2, initrd=initrd2).rid == 2  # published, not activated
    after = digests(boot)
    assert {k: v for k, v in after.items() if not k.endswith(".r2") and "r2." not in k} == before
    assert netboot.find_active(store["root"], NAME, None).rid == 1

    image3, kernel3, initrd3 = files(tmp, "3")
    assert export(image3, kernel=kernel3, initrd=initrd3, activate=True).rid == 3
    now = digests(boot)
    assert entry_of(boot).kernel_url.endswith("/kernel.r3") and entry_of(boot).initrd_url.endswith(
        "/initrd.r3"
    )
    assert "SLX_DNBD3_RID='3'" in (boot / "config").read_text()
    for name in ("ipxe", "config"):  # replaced by a rename: a reader of the old file keeps a whole one
        assert now[name][0] != after[name][0]
    assert {k: v for k, v in now.items() if k in after and k not in ("ipxe", "config")} == {
        k: v for k, v in after.items() if k not in ("ipxe", "config")
    }
    active = netboot.find_active(store["root"], NAME, None)
    assert active.rid == 3 and active.kernel.read_bytes() == kernel3.read_bytes()
    assert not [p.name for p in boot.iterdir() if p.name.startswith(".")]


def test_failed_activation_puts_the_entry_and_config_back(store: dict) -> None:
    """The server is gone when the SIGHUP comes (after the entry and config were replaced): the revision is
    withdrawn and the boot directory is byte for byte what it was, `ipxe` and `config` included."""
    export, boot, tmp = store["export"], store["boot"], store["tmp"]
    image1, kernel1, initrd1 = files(tmp, "1")
    assert export(image1, kernel=kernel1, initrd=initrd1, activate=True).rid == 1
    before = {k: v[1] for k, v in digests(boot).items()}
    image2, kernel2, initrd2 = files(tmp, "2")
    with pytest.raises(Stage4Error, match=r"server reload: no process '?\d+'? \(from .*server\.pid\)"):
        export(image2, kernel=kernel2, initrd=initrd2, activate=True, dying=subprocess.Popen(["sleep", "60"]))
    assert {k: v[1] for k, v in digests(boot).items()} == before
    assert not [p.name for p in boot.iterdir() if p.name.startswith(".")]
    assert netboot.find_active(store["root"], NAME, None).rid == 1


def test_activating_a_revision_without_boot_files_removes_the_entry(store: dict) -> None:
    """A revision without kernel and initramfs has no entry: activating it removes `ipxe` (it would boot
    the previous kernel with the new revision); a failed activation puts it back."""
    export, boot, tmp = store["export"], store["boot"], store["tmp"]
    image1, kernel1, initrd1 = files(tmp, "1")
    assert export(image1, kernel=kernel1, initrd=initrd1, activate=True).rid == 1
    before = {k: v[1] for k, v in digests(boot).items()}
    with pytest.raises(Stage4Error, match=r"server reload: no process"):
        export(image1, activate=True, dying=subprocess.Popen(["sleep", "60"]))
    assert {k: v[1] for k, v in digests(boot).items()} == before
    assert export(image1, activate=True).rid == 2  # the withdrawn revision left no trace, not even its number
    assert not (boot / "ipxe").exists() and "SLX_DNBD3_RID='2'" in (boot / "config").read_text()
    with pytest.raises(InputError, match=r"ipxe: missing \(the active entry, written by `stage4 export"):
        netboot.find_active(store["root"], NAME, None)


def test_prune_keeps_the_revision_the_entry_boots(tmp_path: Path) -> None:
    """`config` rolled back by hand to another revision: the entry still boots revision 1's kernel, so
    prune keeps revision 1 as well as the one config names."""
    root = tmp_path / "store"
    root.mkdir()
    image, kernel, initrd = files(tmp_path, "1")
    for rid in (1, 2, 3, 4):
        options = {"kernel": kernel, "initrd": initrd, "boot_files": True, "activate": rid == 1}
        assert publish(image, root, NAME, check_image=False, **options).rid == rid
    config = root / ".stage4" / NAME / "config"
    config.write_text(config.read_text().replace("SLX_DNBD3_RID='1'", "SLX_DNBD3_RID='2'"))
    assert prune(root, NAME, 1) == [3]


def netboot_line(*args: str) -> str:
    """The one error line of a failed `stage4 netboot` (exit 2: bad input)."""
    from tests.conftest import run_stage4

    result = run_stage4("netboot", *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_netboot_active_refuses_what_a_client_could_not_boot(tmp_path: Path) -> None:
    """`netboot --active` boots what `<boot-dir>/ipxe` and `<boot-dir>/config` give a client, or says in
    one line why it cannot: with --rid, no active revision, no entry, an entry for another revision's
    kernel, an entry that pins its revision, an active revision not in the store."""
    root = tmp_path / "store"
    root.mkdir()
    boot = root / ".stage4" / NAME
    image, kernel, initrd = files(tmp_path, "1")
    assert publish(image, root, NAME, check_image=False, kernel=kernel, initrd=initrd).rid == 1
    line = netboot_line(str(root), NAME, "--active", "--rid", "1")
    assert "--active boots the revision <boot-dir>/config names; it cannot be combined with --rid" in line
    line = netboot_line(str(root), NAME, "--active")
    assert f"{NAME}: no active revision ({boot}/config: no such file; `stage4 export --activate`" in line

    assert publish(image, root, NAME, check_image=False, kernel=kernel, initrd=initrd, activate=True).rid == 2
    assert netboot.find(root, NAME, None, None, active=True).kernel == boot / "kernel.r2"
    entry, config = (boot / "ipxe").read_text(), (boot / "config").read_text()
    cases = [
        ("config", config.replace(NAME, "other.qcow2"), f"{boot}/config: it names no revision of {NAME}"),
        (
            "config",
            config.replace("RID='2'", "RID='1'"),
            f"boots kernel.r2, but {boot}/config names revision 1",
        ),
        ("ipxe", (boot / "ipxe.r2").read_text(), "pins SLX_DNBD3_RID on the kernel command line"),
        (
            "ipxe",
            entry.replace("${slxbase}/initrd.r2", "${slxbase}/x/initrd.r2"),
            "is not in the boot directory",
        ),
    ]
    for file, text, message in cases:
        (boot / file).write_text(text)
        with pytest.raises(InputError, match=re.escape(message)):
            netboot.find_active(root, NAME, None)
        (boot / file).write_text(entry if file == "ipxe" else config)
    (boot / "ipxe").unlink()
    line = netboot_line(str(root), NAME, "--active")
    assert f"{boot}/ipxe: missing (the active entry, written by `stage4 export --activate`" in line
    (boot / "ipxe").write_text(entry)
    os.unlink(root / f"{NAME}.r2")
    with pytest.raises(
        InputError, match=re.escape(f"the active revision 2 ({boot}/config) is not in the store")
    ):
        netboot.find_active(root, NAME, None)


def test_the_entry_is_replaced_before_the_config(tmp_path: Path) -> None:
    """SIGKILL (from outside, a real crash) just before `config` is renamed: the new entry is in place, the
    config is still the old one. So a client that fetched the new entry fetches the new config after it; the
    pair a crash exactly there leaves is what `netboot --active` names in one line."""
    root = tmp_path / "store"
    root.mkdir()
    boot = root / ".stage4" / NAME
    image, kernel, initrd = files(tmp_path, "1")
    options = {"kernel": kernel, "initrd": initrd, "boot_files": True, "activate": True, "check_image": False}
    assert publish(image, root, NAME, **options).rid == 1
    script = f"""
import os, signal
from pathlib import Path
from stage4.export import tempfiles
from stage4.export.publish import publish

real = tempfiles.TempFile.replace

def crash_before_config(self, target):
    if target.name == "config":
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, target)

tempfiles.TempFile.replace = crash_before_config
publish(Path({str(image)!r}), {str(root)!r}, {NAME!r}, kernel=Path({str(kernel)!r}),
        initrd=Path({str(initrd)!r}), boot_files=True, activate=True, check_image=False)
"""
    child = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert entry_of(boot).kernel_url.endswith("/kernel.r2")
    assert "SLX_DNBD3_RID='1'" in (boot / "config").read_text()
    with pytest.raises(InputError, match=re.escape(f"boots kernel.r2, but {boot}/config names revision 1")):
        netboot.find_active(root, NAME, None)


def test_the_remote_script_replaces_the_entry_before_the_config(tmp_path: Path, monkeypatch) -> None:
    """The same order in remote_commit.sh: the store host's shell is killed (SIGKILL) by the `mv` that
    would rename `config` into place (an `mv` first on PATH that kills its shell for that one call)."""
    root = tmp_path / "store"
    root.mkdir()
    boot = root / ".stage4" / NAME
    image, kernel, initrd = files(tmp_path, "1")
    runner = Runner()
    options = {"kernel": kernel, "initrd": initrd, "boot_files": True, "activate": True, "check_image": False}
    where = f"host:{root}"
    assert publish(image, where, NAME, transport=LocalShellTransport(runner), **options).rid == 1
    crash = tmp_path / "bin"
    crash.mkdir()
    (crash / "mv").write_text(
        "#!/bin/sh\nfor last; do :; done\n"
        'case $last in */config) kill -KILL "$PPID"; exit 1 ;; esac\nexec /bin/mv "$@"\n'
    )
    (crash / "mv").chmod(0o755)
    monkeypatch.setenv("PATH", f"{crash}:{os.environ['PATH']}")
    with pytest.raises(Stage4Error, match="nothing published"):
        publish(image, where, NAME, transport=LocalShellTransport(runner), **options)
    assert entry_of(boot).kernel_url.endswith("/kernel.r2")
    assert "SLX_DNBD3_RID='1'" in (boot / "config").read_text()
    with pytest.raises(InputError, match=re.escape(f"boots kernel.r2, but {boot}/config names revision 1")):
        netboot.find_active(root, NAME, None)
