"""The helpers stage4's mltk driver gives modules after mltk's behaviour (add_env, the useradd/groupadd
wrappers, add_to_group, getuid/getgid, get_link_chain, escape_*, copy_kernel, chroot_run) and its
module_init hook, run for real by the driver on the fixture module stage4-helpers and on small failing
modules. Users, groups and /etc/environment land in the test's own copy of /etc, and copy_kernel finds
the test's own kernel in /boot, both bound there in a private mount namespace (the system's useradd and
groupadd run unchanged and change only that copy)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stage4.mltk.plan import DRIVER

FIXTURE = Path(__file__).parent / "fixtures/mltk"


def own_etc_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not own_etc_works(), reason="needs root and unshare -m (a private mount namespace for a copy of /etc)"
)


KERNEL = "6.1.0-stage4-test"


def install(
    module_dir: Path, tmp_path: Path, action: str = "install"
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The driver's install action (or another one) for `module_dir`, with /etc being a fresh copy
    (returned) of it and /boot holding only the kernel KERNEL (readable by root only, as Ubuntu has it)
    and its config."""
    etc, boot = tmp_path / "etc", tmp_path / "boot"
    if not etc.exists():
        subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
        boot.mkdir()
        (boot / f"vmlinuz-{KERNEL}").write_bytes(b"stage4 test kernel")
        (boot / f"vmlinuz-{KERNEL}").chmod(0o600)
        (boot / f"config-{KERNEL}").write_text("CONFIG_STAGE4=y\n")
    work = tmp_path / "work" / module_dir.name
    env = {
        **os.environ,
        "MODULE": module_dir.name,
        "MODULE_DIR": str(module_dir),
        "MODULE_WORK_DIR": str(work),
        "MODULE_BUILD_DIR": str(work / "files"),
        "ROOT_DIR": str(tmp_path),
        "SYS_VERSIONS": "debian.12 debian",
        "SYS_DISTRIBUTION": "debian",
        "KVER": KERNEL,
        "STAGE4_MLTK_OUT": str(tmp_path / "out"),
    }
    script = 'mount --bind "$1" /etc && mount --bind "$2" /boot && exec bash "$3" "$4"'
    done = subprocess.run(
        [
            *("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"),
            *(str(etc), str(boot), str(DRIVER), action),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    return done, etc


def fields(path: Path, name: str) -> list[str]:
    for line in path.read_text().splitlines():
        if line.split(":", 1)[0] == name:
            return line.split(":")
    raise AssertionError(f"no {name} in {path}")


def test_helpers_on_the_fixture_module(tmp_path: Path) -> None:
    done, etc = install(FIXTURE / "core/modules/stage4-helpers", tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    out = done.stdout.splitlines()
    # add_env: once per key, a second call with the same value changes nothing; quotes are escaped.
    environment = (etc / "environment").read_text().splitlines()
    assert environment.count("TZ=':/etc/localtime'") == 1
    assert "GREETING='it'\\''s here'" in environment
    # useradd/groupadd: created once (the second call finds them as asked), a system user with its own
    # group, the account locked ('*') where the system's useradd would leave it without a password.
    user = fields(etc / "passwd", "stage4-fixture-user")
    own_group = fields(etc / "group", "stage4-fixture-user")
    assert int(user[2]) < 1000 and user[3] == own_group[2]
    assert fields(etc / "shadow", "stage4-fixture-user")[1] == "*"
    assert (
        sum(line.startswith("stage4-fixture-user:") for line in (etc / "passwd").read_text().splitlines())
        == 1
    )
    # add_to_group: a member once, after the first one with a comma.
    assert fields(etc / "group", "stage4-fixture-group")[3] == "stage4-fixture-user,root"
    # getuid/getgid/getusergroup by name, getuid by id, nothing for an unknown user.
    assert f"ids: {user[2]} {own_group[2]} {user[3]} 0 []" in out
    # get_link_chain: the path and each link it leads through, below the prefix as ./relative, an
    # absolute link followed into the prefix's tree; without a prefix, absolute paths.
    assert [line.removeprefix("chain: ") for line in out if line.startswith("chain: ")] == [
        "./usr/lib/libstage4.so",
        "./usr/lib/libstage4.so.1",
        "./usr/lib/libstage4.so.1.2",
        "./bin/tool",
        "./usr/bin/stage4-fixture-tool",
    ]
    tree = (tmp_path / "work/stage4-helpers/tree").resolve()
    assert [line.removeprefix("full: ") for line in out if line.startswith("full: ")] == [
        f"{tree}/usr/lib/libstage4.so.1",
        f"{tree}/usr/lib/libstage4.so.1.2",
    ]
    # escape_replace / escape_search make text literal for sed; nfs_cache_avail: stage4 has no NFS cache.
    assert "replaced: a/b&c\\d" in out
    assert "searched: X abc" in out
    assert "no nfs cache" in out
    # copy_kernel: the target kernel (KVER) and its config where mltk's modules expect them, readable.
    kernel = hashlib.sha256(b"stage4 test kernel").hexdigest()
    assert f"kernel: {kernel} 644 CONFIG_STAGE4=y" in out
    # The system's own files are untouched.
    assert "stage4-fixture-user" not in Path("/etc/passwd").read_text()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            'add_env TZ "a"\n\tadd_env TZ "b"',
            "Cannot set TZ to 'b' in /etc/environment as it is already set to 'a'",
        ),
        ("add_env ONLY_KEY", "add_env needs KEY VALUE, got 1 arguments"),
        ("useradd --root /mnt x", "useradd: --root is not allowed in a module"),
        ("useradd root", "useradd root: asked for a normal user, exists with system uid 0"),
        ("useradd --uid 0 stage4-new-user", "useradd stage4-new-user: uid 0 is taken by root"),
        (
            "useradd --gid stage4-no-group stage4-new-user",
            "useradd stage4-new-user: no group stage4-no-group",
        ),
        ("groupadd --gid 0 stage4-new-group", "groupadd stage4-new-group: gid 0 is taken"),
        ("groupadd --system nogroup", "groupadd nogroup: exists with the normal gid 65534"),
        ("add_to_group root stage4-no-group", "Cannot add 'root' to 'stage4-no-group': no such group"),
        ("get_link_chain relative/path", "get_link_chain needs an absolute path, got 'relative/path'"),
        ("KVER=6.1.0-nowhere copy_kernel", "copy_kernel: no kernel '6.1.0-nowhere' in /boot"),
        ("chroot_run", "chroot_run needs exactly 1 parameter (the build folder), got 0"),
        (
            'chroot_run "$MODULE_WORK_DIR/t" <<< "touch /stage4-made; exit 3"',
            "chroot_run: the script in the chroot failed (exit 3)",
        ),
    ],
)
def test_helpers_refuse_what_mltk_refuses(tmp_path: Path, call: str, message: str) -> None:
    module = tmp_path / "mltk/core/modules/stage4-refused"
    module.mkdir(parents=True)
    (module / "module.conf").write_text("")
    (module / "module.build").write_text(f"post_copy() {{\n\t{call}\n\techo 'went on'\n}}\n")
    done, etc = install(module, tmp_path)
    assert done.returncode != 0
    assert (
        done.stderr.splitlines()[0]
        == "mltk module stage4-refused: post_copy failed (exit 1); its last lines:"
    )
    assert f"[error]   [stage4-refused] {message}" in done.stderr, done.stderr
    assert "went on" not in done.stdout
    assert "stage4-new" not in (etc / "passwd").read_text() + (etc / "group").read_text()


def test_module_init_then_build_with_chroot_run(tmp_path: Path) -> None:
    module = FIXTURE / "core/modules/stage4-helpers"
    init, _ = install(module, tmp_path, "init")
    assert init.returncode == 0, init.stderr + init.stdout
    # module_init alone (no build, no post_copy), with the general module.conf only, as mltk runs it.
    work = tmp_path / "work/stage4-helpers"
    tree = shutil.which("tree") or "none"
    assert (work / "init").read_text() == f"module_init: tree={tree} conf=[]\n"
    assert "## build" not in init.stdout and "## post_copy" not in init.stdout
    done, _ = install(module, tmp_path, "build")
    assert done.returncode == 0, done.stderr + done.stdout
    # chroot_run: the script saw the build folder's file over this system and wrote into the build
    # folder; the file it removed is listed, and still on this system.
    share = work / "files/usr/local/share/stage4-helpers"
    assert (share / "chroot").read_text() == f"chroot: module_init: tree={tree} conf=[]\n"
    assert (work / "files/overlay.whiteout.list").read_text() == "/etc/os-release\n"
    assert not os.path.lexists(work / "files/etc/os-release") and os.path.lexists("/etc/os-release")
    with tarfile.open(tmp_path / "out/stage4-helpers.tar") as archive:
        assert {f"files/usr/local/share/stage4-helpers/{name}" for name in ("init", "chroot")} <= set(
            archive.getnames()
        )
