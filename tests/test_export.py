"""`stage4 export`: store layout, revisions, atomicity, locking, refusals, remote script, prune."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from stage4.dnbd3.crc import parse_crc_file
from stage4.dnbd3.store import Store, parse_rid, validate_name
from stage4.errors import InputError, Stage4Error
from stage4.export.publish import publish
from stage4.export.revisions import prune
from stage4.runner import Runner
from tests.transports import LocalShellTransport

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
STAGE4 = [sys.executable, "-m", "stage4"]


def visible(store: Path) -> list[str]:
    """What dnbd3-server's scan can see: every path without a hidden component."""
    found = []
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append(str(rel))
    return found


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(16 * MiB + 5000))
    return path


@pytest.fixture
def boot(tmp_path) -> tuple[Path, Path]:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initrd" * 100)
    return kernel, initrd


def export(image: Path, store: Path, name: str = "stage4/test.qcow2", **kwargs):
    kwargs.setdefault("boot_files", False)
    return publish(image, store, name, check_image=False, **kwargs)


def test_export_layout_crc_and_record(tmp_path, image, boot):
    store = tmp_path / "store"
    store.mkdir()
    pub = export(
        image,
        store,
        kernel=boot[0],
        initrd=boot[1],
        boot_files=True,
        servers=["10.0.0.1", "10.0.0.2:5003"],
        source_identity="abc123",
    )
    assert pub.rid == 1
    assert visible(store) == ["stage4/test.qcow2.r1", "stage4/test.qcow2.r1.crc"]
    published = store / "stage4/test.qcow2.r1"
    data = image.read_bytes()
    assert published.read_bytes() == data + bytes(-len(data) % 4096)  # padded to 4096 (R1)
    crc = (store / "stage4/test.qcow2.r1.crc").read_bytes()
    assert len(crc) == 3 * 4 and parse_crc_file(crc, published.stat().st_size)
    meta = store / ".stage4/stage4/test.qcow2"
    assert (meta / "kernel.r1").read_bytes() == boot[0].read_bytes()
    assert (meta / "initrd.r1").read_bytes() == boot[1].read_bytes()
    config = (meta / "config.r1").read_text()
    assert "SLX_DNBD3_SERVERS='10.0.0.1 10.0.0.2:5003'\n" in config
    assert "SLX_DNBD3_IMAGE='stage4/test.qcow2'\n" in config
    assert "SLX_DNBD3_RID='1'\n" in config
    assert "SLX_SYSTEM_PARTITION_IDENTIFIER='SLX_SYS'\n" in config
    record = json.loads((meta / "publication.r1.json").read_text())
    import hashlib

    assert record["sha256"] == hashlib.sha256(published.read_bytes()).hexdigest() == pub.sha256
    assert record["size"] == published.stat().st_size and record["rid"] == 1
    assert record["source"]["identity"] == "abc123" and record["source"]["size"] == len(data)
    assert not list(store.rglob("*.map")) and not list(store.rglob("*.meta"))
    assert not [p for p in store.rglob("*.part")]


def test_zero_image_crc_matches_reference_vector(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(16 * MiB + 5000))
    export(zeros, store, "z")
    assert (store / "z.r1.crc").read_bytes().hex(" ") == "a9 a6 dc fd 4a a1 7c a4 94 99 f4 d8"
    assert (store / "z.r1").stat().st_size == 16_785_408


def test_second_export_gets_next_rid_and_given_rid_is_never_overwritten(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    assert export(image, store).rid == 1
    assert export(image, store).rid == 2
    before = (store / "stage4/test.qcow2.r2").stat()
    with pytest.raises(InputError, match="revision 2 exists"):
        export(image, store, rid=2)
    after = (store / "stage4/test.qcow2.r2").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert export(image, store, rid="70").rid == 70
    assert export(image, store).rid == 71
    assert [r.rid for r in Store(store).revisions("stage4/test.qcow2")] == [1, 2, 70, 71]


def test_orphan_crc_blocks_its_rid(tmp_path, image):
    store = tmp_path / "store"
    (store / "stage4").mkdir(parents=True)
    (store / "stage4/test.qcow2.r5.crc").write_bytes(b"x" * 8)
    with pytest.raises(
        InputError,
        match=re.escape(f"stage4/test.qcow2: revision 5 exists in {store}; it is never overwritten"),
    ):
        export(image, store, rid=5)
    assert export(image, store).rid == 6
    assert (store / "stage4/test.qcow2.r5.crc").read_bytes() == b"x" * 8


def test_killed_export_leaves_only_hidden_files_and_rerun_works(tmp_path, image):
    """SIGKILL after every file was written under its hidden name, before the commit: nothing visible."""
    store = tmp_path / "store"
    store.mkdir()
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from stage4.export import local
        from stage4.export.publish import publish

        def stop_before_commit(*args):  # the fault comes from outside: the commit never happens
            print("READY", flush=True)
            time.sleep(60)

        local.LocalExport.commit = stop_before_commit
        publish(Path({str(image)!r}), {str(store)!r}, "stage4/test.qcow2", check_image=False,
                boot_files=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        hidden = [p for p in store.rglob("*") if p.is_file() and p.name.endswith(".part")]
        assert hidden, "the export should have written hidden temporary files"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert visible(store) == []
    assert all(p.name.startswith(".") for p in store.rglob("*") if p.is_file())
    assert export(image, store).rid == 1
    assert not list(store.rglob("*.part")), "stale temporaries of the killed export are cleaned up"


def test_concurrent_exports_get_distinct_revisions(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from stage4.export.publish import publish
        print(publish(Path({str(image)!r}), {str(store)!r}, "n", check_image=False, boot_files=False).rid)
    """)
    children = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    rids = sorted(int(c.communicate(timeout=60)[0]) for c in children)
    assert rids == [1, 2, 3, 4]
    assert sorted(visible(store)) == sorted([f"n.r{r}" for r in rids] + [f"n.r{r}.crc" for r in rids])


def test_concurrent_threads_also_get_distinct_revisions(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    rids, errors = [], []

    def run():
        try:
            rids.append(export(image, store, "t").rid)
        except Stage4Error as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and sorted(rids) == [1, 2, 3]


def test_qcow2_with_backing_file_is_refused(tmp_path):
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay], check=True
    )
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(InputError, match="backing file"):
        export(overlay, store)
    assert visible(store) == []
    standalone = tmp_path / "standalone.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", overlay, standalone], check=True)
    pub = export(standalone, store)
    assert (store / "stage4/test.qcow2.r1").read_bytes()[:4] == b"QFI\xfb"
    assert pub.size % 4096 == 0


CHARS = "(use letters, digits and . _ - + @ , = ~)"

# (name, what the refusal says after "image name {name!r}: ")
BAD_NAMES = [
    ("", "empty"),
    ("/abs/img", "must be relative to the store (no leading '/')"),
    ("a/../img", "path component '..' is not allowed"),
    ("..", "path component '..' is not allowed"),
    ("a//img", "empty path component ('//'); the server would register a second image for it"),
    ("img/", "must not end with '/'"),
    (".hidden", "component '.hidden' starts with '.'; the server skips hidden files and directories"),
    ("a/.img", "component '.img' starts with '.'; the server skips hidden files and directories"),
    ("./img", "path component '.' is not allowed"),
    ("a/./img", "path component '.' is not allowed"),
    ("x" * 151 + "/img", "directory 'xxxxxxxxxxxxxxxxxxxx'... is longer than the server's 150-byte limit"),
    ("y" * 144, "last component is longer than 143 bytes (the file name with '.r<RID>' must fit 150)"),
    ("with space", "character ' ' is not allowed " + CHARS),
    ("star*", "character '*' is not allowed " + CHARS),
    ("q?", "character '?' is not allowed " + CHARS),
    ("br[a]ck", "character '[' is not allowed " + CHARS),
    ("quo'te", 'character "\'" is not allowed ' + CHARS),
    ("tab\tname", "character '\\t' is not allowed " + CHARS),
    ("nul\0byte", "character '\\x00' is not allowed " + CHARS),
    ("ümlaut", "character 'ü' is not allowed " + CHARS),
    ("img.r7", "must not end in '.r<number>' (the server would read that as a revision)"),
    ("img.crc", "must not end in .crc, .map or .meta"),
    ("a\\b", "character '\\\\' is not allowed " + CHARS),
]


@pytest.mark.parametrize(("name", "problem"), BAD_NAMES)
def test_bad_names_are_refused(tmp_path, image, name, problem):
    message = "^" + re.escape(f"image name {name!r}: {problem}") + "$"
    with pytest.raises(InputError, match=message) as info:
        validate_name(name)
    assert "\n" not in str(info.value)
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(InputError, match=message):
        export(image, store, name)
    assert list(store.iterdir()) == []


def test_good_names_are_accepted():
    for name in [
        "img",
        "stage4/debian-12.qcow2",
        "a/b/c/rocky+workers-internal.qcow2",
        "x" * 143,
        "v1.2_3@4",
    ]:
        assert validate_name(name) == name


@pytest.mark.parametrize("value", ["0", "65536", "07", "-1", "1.0", "x", ""])
def test_bad_rids_are_refused(value):
    with pytest.raises(
        InputError,
        match="^"
        + re.escape(f"revision {value!r}: must be a plain decimal number 1..65535 without leading zeros")
        + "$",
    ):
        parse_rid(value)


def test_cli_refuses_bad_name_with_exit_code_2_and_one_line(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    for name in ["../escape", "/abs", "a//b", ".hidden", "z" * 200]:
        result = subprocess.run(
            [*STAGE4, "export", str(image), "--store", str(store), "--name", name],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "image name" in result.stderr
    result = subprocess.run(
        [*STAGE4, "export", str(image), "--store", str(store), "--name", "ok", "--rid", "007"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 2 and "leading zeros" in result.stderr
    assert list(store.iterdir()) == []


def test_revisions_and_prune(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    for _ in range(5):
        export(image, store, "p")
    assert prune(store, "p", 2, protect=[1], dry_run=True) == [2, 3]
    assert prune(store, "p", 2, protect=[1]) == [2, 3]
    assert [r.rid for r in Store(store).revisions("p")] == [1, 4, 5]
    assert sorted(visible(store)) == sorted(f"p.r{r}{s}" for r in (1, 4, 5) for s in ("", ".crc"))
    assert not (store / ".stage4/p/publication.r2.json").exists()
    assert prune(store, "p", 1) == [1, 4]
    assert [r.rid for r in Store(store).revisions("p")] == [5]
    with pytest.raises(
        InputError, match=r"^--keep must be at least 1 \(the newest revision is never removed\)$"
    ):
        prune(store, "p", 0)
    out = subprocess.run(
        [*STAGE4, "revisions", "p", "--store", str(store), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    ).stdout
    assert [row["rid"] for row in json.loads(out)] == [5]


def test_remote_store_script_publishes_the_same_layout(tmp_path, image, boot):
    """The script an SSH store runs, executed by the local shell (the transport differs, nothing else)."""
    store = tmp_path / "remote"
    store.mkdir()
    runner = Runner()
    transport = LocalShellTransport(runner)
    kwargs = {
        "check_image": False,
        "transport": transport,
        "runner": runner,
        "kernel": boot[0],
        "initrd": boot[1],
        "servers": ["10.1.1.1"],
        "activate": True,
    }
    pub = publish(image, f"fakehost:{store}", "r/img.qcow2", **kwargs)
    assert pub.rid == 1 and pub.image == f"fakehost:{store}/r/img.qcow2.r1"
    pub2 = publish(image, f"fakehost:{store}", "r/img.qcow2", **kwargs)
    assert pub2.rid == 2
    local = tmp_path / "local"
    local.mkdir()
    reference = export(image, local, "r/img.qcow2")
    assert visible(store) == ["r/img.qcow2.r1", "r/img.qcow2.r1.crc", "r/img.qcow2.r2", "r/img.qcow2.r2.crc"]
    assert (store / "r/img.qcow2.r1").read_bytes() == Path(reference.image).read_bytes()
    assert (store / "r/img.qcow2.r1.crc").read_bytes() == Path(reference.crc).read_bytes()
    meta = store / ".stage4/r/img.qcow2"
    assert (meta / "kernel.r2").read_bytes() == boot[0].read_bytes()
    assert "SLX_DNBD3_RID='2'" in (meta / "config").read_text()
    assert json.loads((meta / "publication.r2.json").read_text())["rid"] == 2
    with pytest.raises(InputError, match="revision 1 exists"):
        publish(image, f"fakehost:{store}", "r/img.qcow2", rid=1, **kwargs)
    assert not [p for p in store.rglob("*") if "stage4-" in p.name], "temporaries are removed after a refusal"


def test_reload_sends_sighup_to_the_dev_server(tmp_path, image):
    """R4: a fresh revision is listed by /query only after a SIGHUP (or a client selecting it)."""
    from stage4.dnbd3.client import query_images

    store = tmp_path / "store"
    store.mkdir()
    pidfile = tmp_path / "server.pid"
    server = subprocess.Popen(
        [*STAGE4, "serve", str(store), "--port", "0", "--pidfile", str(pidfile)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = server.stderr.readline()
        address = line.split(" on ", 1)[1].split(",", 1)[0]
        export(image, store, "live")
        assert [i["name"] for i in query_images(address, timeout=5)] == []
        export(image, store, "live", reload_pidfile=pidfile)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listed = sorted(i["rid"] for i in query_images(address, timeout=5) if i["name"] == "live")
            if listed == [1, 2]:
                break
            time.sleep(0.1)
        assert listed == [1, 2]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_reload_with_dead_pid_is_a_clear_error(tmp_path, image):
    store = tmp_path / "store"
    store.mkdir()
    pidfile = tmp_path / "pid"
    pidfile.write_text("999999\n")
    with pytest.raises(Stage4Error, match="no process"):
        export(image, store, "x", reload_pidfile=pidfile)


def test_temporaries_are_created_under_the_store_lock(tmp_path, image):
    """Another export's cleanup runs under the store lock: it must never see our temporary in the instant
    between its creation and its flock (it would delete it, and our commit would fail)."""
    store = tmp_path / "store"
    store.mkdir()
    result = []
    with Store(store).lock():
        worker = threading.Thread(target=lambda: result.append(export(image, store, "l").rid))
        worker.start()
        time.sleep(0.5)
        assert not list(store.rglob("*.part")), "a temporary was created without the store lock"
    worker.join(timeout=60)
    assert result == [1] and visible(store) == ["l.r1", "l.r1.crc"]
