"""Export to a remote store through a real sshd on 127.0.0.1 (tests/sshd_server.py: our own instance with
its own port, host key, client key and authorized_keys in tmp; no system service is used or changed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stage4.errors import InputError, Stage4Error
from stage4.export.publish import publish
from stage4.export.remote import SshTransport
from stage4.runner import Runner
from tests import sshd_server
from tests.sshd_server import children, free_port, is_live, kill

sshd = sshd_server.sshd  # the fixture
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
NAME = "r/img.qcow2"


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(16 * MiB + 5000))  # not a multiple of 4096: the padding is exercised
    path.chmod(0o600)  # the published copy must still be readable by the server's user
    return path


@pytest.fixture
def boot(tmp_path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(500_000))
    kernel.chmod(0o600)
    return kernel, initrd


def tree(store: Path) -> dict[str, tuple[int, int]]:
    """Every file of a store (hidden ones too) -> (mode, size)."""
    return {
        str(p.relative_to(store)): (p.stat().st_mode & 0o7777, p.stat().st_size)
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


def visible(store: Path) -> list[str]:
    return [name for name in tree(store) if not any(part.startswith(".") for part in name.split("/"))]


@pytest.mark.parametrize("copier", ["rsync", "scp"])
def test_ssh_export_is_byte_identical_to_a_local_export(sshd, tmp_path, image, boot, copier):
    remote, local = tmp_path / "remote", tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    runner = Runner()
    transport = SshTransport(sshd.host, runner, sshd.options, use_rsync=copier == "rsync")
    kwargs = {
        "check_image": False,
        "kernel": boot[0],
        "initrd": boot[1],
        "servers": ["10.1.1.1", "10.1.1.2:5003"],
        "activate": True,
        "runner": runner,
    }
    pub = publish(image, f"{sshd.host}:{remote}", NAME, transport=transport, **kwargs)
    assert transport.copier == copier
    ref = publish(image, local, NAME, **kwargs)
    assert pub.rid == ref.rid == 1
    assert (
        pub.image == f"{sshd.host}:{remote}/{NAME}.r1" and pub.sha256 == ref.sha256 and pub.size == ref.size
    )

    assert tree(remote) == tree(local), "same names, modes and sizes"
    assert visible(remote) == [f"{NAME}.r1", f"{NAME}.r1.crc"]
    record = f".stage4/{NAME}/publication.r1.json"
    for name in tree(local):
        if name not in (record, ".stage4.lock"):
            assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    records = [json.loads((store / record).read_text()) for store in (remote, local)]
    for item in records:
        item.pop("published_at")
    assert records[0] == records[1]

    pub2 = publish(image, f"{sshd.host}:{remote}", NAME, transport=transport, **kwargs)
    assert pub2.rid == 2 and visible(remote) == [
        f"{NAME}.r1",
        f"{NAME}.r1.crc",
        f"{NAME}.r2",
        f"{NAME}.r2.crc",
    ]
    assert "SLX_DNBD3_RID='2'" in (remote / f".stage4/{NAME}/config").read_text()
    with pytest.raises(InputError, match="revision 1 exists"):
        publish(image, f"{sshd.host}:{remote}", NAME, rid=1, transport=transport, **kwargs)
    assert not [p for p in remote.rglob("*") if "stage4-" in p.name], "no temporaries left after a refusal"


def _publish_script(image: Path, store: str, options: list[str], name: str = NAME) -> str:
    return textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from stage4.errors import Interrupted
        from stage4.export.publish import publish
        from stage4.runner import install_signal_handlers
        install_signal_handlers()
        try:
            pub = publish(Path({str(image)!r}), {store!r}, {name!r}, check_image=False, boot_files=False,
                          ssh_options={options!r})
        except Interrupted:
            print("INTERRUPTED", flush=True)
            sys.exit(130)
        print(pub.rid, flush=True)
    """)


def test_concurrent_ssh_exports_get_distinct_revisions(sshd, tmp_path, image):
    remote = tmp_path / "remote"
    remote.mkdir()
    script = _publish_script(image, f"{sshd.host}:{remote}", sshd.options)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    results = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), [err[-800:] for _, err in results]
    assert sorted(int(out) for out, _ in results) == [1, 2]
    assert visible(remote) == [f"{NAME}.r1", f"{NAME}.r1.crc", f"{NAME}.r2", f"{NAME}.r2.crc"]
    assert (remote / f"{NAME}.r1").read_bytes() == (remote / f"{NAME}.r2").read_bytes()


def _start_big_upload(sshd, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    big = tmp_path / "big.img"
    with big.open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(8 * MiB))
    remote = tmp_path / "remote"
    remote.mkdir()
    script = _publish_script(big, f"{sshd.host}:{remote}", sshd.options)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    deadline = time.monotonic() + 60
    while True:  # wait until the image upload is under way, then interrupt it
        parts = [p for p in remote.rglob(".img.qcow2.stage4-*.part") if p.stat().st_size > 0]
        if parts and parts[0].stat().st_size < big.stat().st_size:
            return child, remote
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.01)


def test_interrupted_ssh_upload_leaves_nothing_in_the_store(sshd, tmp_path, image):
    """SIGTERM (Ctrl-C, a killed job) mid-copy: the copier is stopped, the remote temporaries removed."""
    child, remote = _start_big_upload(sshd, tmp_path)
    copiers = children(child.pid)
    assert copiers, "the upload runs in a child process"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "INTERRUPTED" in out, err[-800:]
    assert visible(remote) == []
    assert not [p for p in remote.rglob("*") if "stage4-" in p.name], "the remote temporaries are removed"
    assert not [p for p in copiers if is_live(p)], "rsync/ssh of the interrupted export still run"
    assert (
        publish(
            image,
            f"{sshd.host}:{remote}",
            NAME,
            check_image=False,
            boot_files=False,
            ssh_options=sshd.options,
        ).rid
        == 1
    )


def test_killed_ssh_upload_leaves_no_visible_file(sshd, tmp_path, image):
    """SIGKILL of the export and its copier mid-copy (no cleanup can run): only hidden files remain."""
    child, remote = _start_big_upload(sshd, tmp_path)
    tree_pids = [child.pid, *children(child.pid)]
    kill(tree_pids)
    child.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while any(is_live(p) for p in tree_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the remote rsync notices the closed connection
    assert visible(remote) == []
    assert [p.name for p in remote.rglob("*.part")], "the partial upload stays, under a hidden name"
    assert (
        publish(
            image,
            f"{sshd.host}:{remote}",
            NAME,
            check_image=False,
            boot_files=False,
            ssh_options=sshd.options,
        ).rid
        == 1
    )
    assert visible(remote) == [f"{NAME}.r1", f"{NAME}.r1.crc"]


def test_ssh_failures_are_one_line_errors(sshd, tmp_path, image):
    remote = tmp_path / "remote"
    remote.mkdir()
    closed = [f"Port={free_port()}" if o.startswith("Port=") else o for o in sshd.options]
    with pytest.raises(Stage4Error, match=r"ssh to root@127.0.0.1 failed \(exit 255"):
        publish(image, f"{sshd.host}:{remote}", NAME, check_image=False, boot_files=False, ssh_options=closed)
    with pytest.raises(InputError, match="not a directory"):
        publish(
            image,
            f"{sshd.host}:{remote}/missing",
            NAME,
            check_image=False,
            boot_files=False,
            ssh_options=sshd.options,
        )
    assert tree(remote) == {}


@pytest.mark.parametrize(
    "store, options, message",
    [
        ("-oProxyCommand=x:/srv", (), "store host"),
        ("host:/srv/a b", (), "store path"),
        ("host:/srv/$(reboot)", (), "store path"),
        ("host:/srv", ("-F/etc/passwd",), "ssh option"),
        ("host:/srv", ("Port",), "ssh option"),
        ("host:/srv", ("ProxyCommand='x'",), "ssh option"),
    ],
)
def test_bad_remote_stores_and_ssh_options_are_refused(tmp_path, image, store, options, message):
    with pytest.raises(InputError, match=message):
        publish(image, store, NAME, check_image=False, boot_files=False, ssh_options=options)


def test_cli_ssh_option_errors_are_one_line_with_exit_code_2(tmp_path, image):
    for extra in (
        ["--store", str(tmp_path), "--ssh-option", "Port=2222"],
        ["--store", "host:/srv", "--ssh-option", "-oPort=2"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "stage4", "export", str(image), "--name", NAME, "--no-boot-files", *extra],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
