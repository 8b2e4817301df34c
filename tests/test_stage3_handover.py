"""Stage 3 (dnbd3-rootfs) and what it hands to stage 4: the revision rule, /opt/openslx/config (sourced by
stage-4 scripts in dash, bash and busybox sh: it must only assign) and the checks of config.tgz, run on
the host with the module's own shell code, real shells and busybox tar."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.archives import tgz

MODULE = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs"
LIB = MODULE / "stage4-lib.sh"


def bash(script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f". {LIB}\n{script}"],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_revision_is_decimal_0_to_65535_without_leading_zeros() -> None:
    for good in ("0", "1", "10", "370", "9999", "65535"):
        result = bash(f"slx_check_rid '{good}'")
        assert (result.returncode, result.stdout) == (0, ""), good
    bad_rids = ("010", "08", "00", "65536", "99999", "123456", "-1", "+1", "", " 1", "1 ", "0x1", "1e3")
    for bad in bad_rids:
        result = bash(f"slx_check_rid '{bad}'")
        assert result.returncode == 1, bad
        assert result.stdout == (
            f"stage4: SLX_DNBD3_RID '{bad}' is not a revision "
            "(a decimal number 0-65535 without leading zeros; 0 = the latest)\n"
        ), bad


def test_dnbd3root_checks_the_revision_with_the_rule() -> None:
    """The stage-3 script refuses what slx_check_rid refuses, before anything uses the number."""
    script = (MODULE / "dnbd3root.sh").read_text()
    check = script.index('why=$(slx_check_rid "$rid") || stop_boot "$why"')
    assert check < script.index("slx_pick_server")
    assert "case $rid in" not in script  # the old rule, which let 010 through


# Values a config server (or a command line) may send: each would run something if the file were
# written carelessly; the markers prove that nothing ran.
HOSTILE = {
    "SLX_SUBST": "$(touch {m}/subst)",
    "SLX_BACKTICK": "`touch {m}/backtick`",
    "SLX_QUOTE": "it's '; touch {m}/quote; '",
    "SLX_DOUBLE": '"$(touch {m}/double)"',
    "SLX_SEMI": "a; touch {m}/semi",
    "SLX_NEWLINE": "first\ntouch {m}/newline\nlast'\n",
    "SLX_BACKSLASH": "a\\'b\\\\",
    "SLX_EMPTY": "",
    "SLX_SPACES": "  two  spaces  ",
}

SHELLS = ["dash", "bash", "busybox sh"]


def test_openslx_config_only_assigns_in_every_shell(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    marker.mkdir()
    values = {key: value.format(m=marker) for key, value in HOSTILE.items()}
    # From the config file (all but the newline value, which a line-based file cannot carry), one key
    # overridden on the command line, and the newline value set as any variable of the script may be.
    config = "".join(
        f"{key}='" + value.replace("'", "'\\''") + "'\n" for key, value in values.items() if "\n" not in value
    )
    config += "SLX_DNBD3_RID='3'\nOTHER='x'\n"
    setter = (
        "SLX_NEWLINE=$(printf 'first\\ntouch %s/newline\\nlast'\"'\"'\\n_'); SLX_NEWLINE=${SLX_NEWLINE%%_}"
    )
    written = bash(
        f"slx_parse_config\nslx_apply_cmdline 'quiet SLX_DNBD3_RID=4 slxsrv=x'\n"
        f"{setter % marker}\n_slx_key SLX_NEWLINE\nslx_write_config",
        stdin=config,
    )
    assert written.returncode == 0, written.stderr
    path = tmp_path / "config"
    path.write_text(written.stdout)
    expected = {**values, "SLX_DNBD3_RID": "4"}
    embedded = sum(value.count("\n") for value in expected.values())
    assert written.stdout.count("\n") == len(expected) + embedded  # one line a key
    assert "OTHER" not in written.stdout and "slxsrv" not in written.stdout
    names = " ".join(expected)
    show = f'for k in {names}; do eval "v=\\${{$k-UNSET}}"; printf "%s=%s\\0" "$k" "$v"; done'
    for shell in SHELLS:
        argv = shell.split()
        if not shutil.which(argv[0]):
            pytest.skip(f"needs {argv[0]}")
        result = subprocess.run(
            [*argv, "-c", f'P=$PATH; . "$1"; {show}; [ "$PATH" = "$P" ]', "sh", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
            cwd=tmp_path,
        )
        assert result.returncode == 0, (shell, result.stderr)
        assert result.stderr == "", (shell, result.stderr)
        got = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
        assert got == expected, shell
        assert list(marker.iterdir()) == [], f"{shell} ran a command from the config"


@pytest.fixture
def busybox() -> None:
    if not shutil.which("busybox"):
        pytest.skip("needs busybox (the initramfs unpacks config.tgz with busybox tar)")


def test_config_tgz_members_stay_inside_the_root(tmp_path: Path, busybox: None) -> None:
    good = tgz(tmp_path / "good.tgz", {"etc/motd": b"hi\n", "./opt/openslx/x": b"", "a/..b": b""})
    assert bash(f"slx_check_archive {good} config.tgz.r3").returncode == 0
    # busybox tar strips these (and says so) ...
    stripped = {"/etc/passwd": "'/'", "../x": "'../'", "etc/../../x": "'etc/../../'"}
    # ... and keeps these as they are
    kept = {"a/..": "a/..", "..": ".."}
    for i, (bad, named) in enumerate({**stripped, **kept}.items()):
        archive = tgz(tmp_path / f"bad{i}.tgz", {"etc/ok": b"", bad: b""})
        result = bash(f"slx_check_archive {archive} config.tgz.r3")
        assert result.returncode == 1, bad
        assert result.stdout.startswith("stage4: config.tgz.r3 has a member outside the root ("), bad
        assert result.stdout.endswith("); nothing unpacked\n"), bad
        assert result.stdout.count("\n") == 1 and named in result.stdout, bad
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as archive:
        archive.addfile(tarfile.TarInfo("x"), io.BytesIO())
    for not_tgz in (plain, tmp_path / "missing.tgz"):
        result = bash(f"slx_check_archive {not_tgz} config.tgz.r3")
        assert result.returncode == 1
        assert result.stdout.startswith("stage4: config.tgz.r3 is not a gzip'ed tar archive (")
        assert result.stdout.count("\n") == 1


def test_handover_unpacks_config_tgz_and_writes_the_config(tmp_path: Path, busybox: None) -> None:
    """stage4-handover (the pre-pivot hook's script) on a directory standing for the new root."""
    state, root = tmp_path / "run", tmp_path / "sysroot"
    state.mkdir()
    root.mkdir()
    (state / "config").write_text("SLX_DNBD3_RID='3'\nSLX_CONFIG_NAME='config.tgz.r3'\n")
    tgz(state / "config.tgz", {"etc/stage4-site": b"site\n", "opt/openslx/config": b"SLX_OLD='1'\n"})
    dracut = "getarg() { return 1; }; getargbool() { return 1; }"
    result = subprocess.run(
        ["bash", "-c", f'{dracut}; . "$0" "$1"', str(MODULE / "stage4-handover.sh"), str(root)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STAGE4_LIB": str(MODULE), "STAGE4_STATE": str(state)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (root / "etc/stage4-site").read_text() == "site\n"
    assert (root / "opt/openslx/config").read_text() == (state / "config").read_text()  # ours wins
    assert (root / "opt/openslx/config").stat().st_mode & 0o777 == 0o644
    # not a Stage4 client boot: nothing happens
    (state / "config").unlink()
    (root / "opt/openslx/config").unlink()
    again = subprocess.run(
        ["bash", "-c", f'{dracut}; . "$0" "$1"', str(MODULE / "stage4-handover.sh"), str(root)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STAGE4_LIB": str(MODULE), "STAGE4_STATE": str(state)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert again.returncode == 0
    assert not (root / "opt/openslx/config").exists()


def _stop_boot(tmp_path: Path, setup: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """slx_stop_boot with dracut's functions and the machine's reboot replaced by ones that say what
    they were asked (the host must not reboot), the console a file."""
    console = tmp_path / "console"
    stand_ins = (
        'getargbool() { [ "$2" = rd.shell ] && [ "$RD_SHELL" = 1 ]; }\n'
        'emergency_shell() { echo "emergency_shell $*"; }\n'
        'systemctl() { echo "systemctl $*"; }\n'
        'sleep() { echo "sleep $*"; }\n'
        f"STAGE4_CONSOLE={console}\n"
    )
    result = bash(stand_ins + setup + '\nslx_stop_boot "stage4: it broke"\necho not reached')
    return result, console.read_text()


def test_a_failure_reboots_after_the_timeout_or_opens_the_shell(tmp_path: Path) -> None:
    result, console = _stop_boot(tmp_path, "")
    assert (result.returncode, console) == (1, "stage4: it broke\n")
    assert result.stdout == "sleep 60\nsystemctl --no-block reboot\n"  # default 60 s, then reboot
    result, _ = _stop_boot(tmp_path, "SLX_REBOOT_TIMEOUT=5")
    assert result.stdout == "sleep 5\nsystemctl --no-block reboot\n"
    result, _ = _stop_boot(tmp_path, "SLX_REBOOT_TIMEOUT='5; touch x'")
    assert result.stdout == "sleep 60\nsystemctl --no-block reboot\n"  # not a number: the default
    result, console = _stop_boot(tmp_path, "RD_SHELL=1")
    assert (result.returncode, console) == (1, "stage4: it broke\n")
    assert result.stdout == "emergency_shell -n stage4 stage4: it broke\n"  # no reboot
