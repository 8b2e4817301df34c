"""The stage-3 dracut module (dnbd3-rootfs): its shell functions run on the host against fixture inputs.

Config parsing (file, command-line overrides, quoting), server choice against real DNBD3 servers on
127.0.0.1 (stage4's development server), partition choice on real GPT disks (sfdisk, mkfs.ext4, losetup
and partx, blkid), and dracut accepting the module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from stage4.dnbd3.server import DevServer

MODULE = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs"
LIB = MODULE / "stage4-lib.sh"


def bash(script: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-c", f". {LIB}\n{script}"],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def show(*names: str) -> str:
    return "".join(f'printf "%s=[%s]\\n" {n} "${{{n}-UNSET}}"\n' for n in names)


CONFIG = """\
# stage-3 config as `stage4 export` and site templates write it
SLX_DNBD3_SERVERS='10.0.0.1 10.0.0.2:5004'
SLX_DNBD3_IMAGE="stage4/debian 12.qcow2"
SLX_DNBD3_RID=3
  export SLX_SYSTEM_PARTITION_IDENTIFIER='SLX_SYS'
SLX_QUOTES='it'\\''s "quoted"'
SLX_DOUBLE="a \\"b\\" \\$HOME"
SLX_COMMENT=bare # trailing comment
SLX_EVIL=$(touch {marker})
PATH=/nowhere
read_only_partition="/dev/disk/by-label/system"
"""


def test_config_file_values_and_quoting(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = bash(
        "slx_parse_config\n"
        + show(
            "SLX_DNBD3_SERVERS",
            "SLX_DNBD3_IMAGE",
            "SLX_DNBD3_RID",
            "SLX_SYSTEM_PARTITION_IDENTIFIER",
            "SLX_QUOTES",
            "SLX_DOUBLE",
            "SLX_COMMENT",
            "read_only_partition",
        )
        + 'echo "PATH=$PATH"',
        stdin=CONFIG.format(marker=marker),
    ).stdout
    assert "SLX_DNBD3_SERVERS=[10.0.0.1 10.0.0.2:5004]" in out
    assert "SLX_DNBD3_IMAGE=[stage4/debian 12.qcow2]" in out
    assert "SLX_DNBD3_RID=[3]" in out
    assert "SLX_SYSTEM_PARTITION_IDENTIFIER=[SLX_SYS]" in out
    assert 'SLX_QUOTES=[it\'s "quoted"]' in out
    assert 'SLX_DOUBLE=[a "b" $HOME]' in out
    assert "SLX_COMMENT=[bare]" in out
    assert "read_only_partition=[UNSET]" in out  # only SLX_ keys are taken
    assert "PATH=/nowhere" not in out
    assert not marker.exists(), "the config file was run as a script"


def test_command_line_overrides_the_file() -> None:
    cmdline = (
        "initrd=initrd.r3 slxsrv=10.0.2.100 slxbase=boot SLX_DNBD3_RID=4 "
        'SLX_DNBD3_SERVERS="10.0.2.101 10.0.2.102" console=ttyS0,115200n8 quiet'
    )
    out = bash(
        f"slx_parse_config\nslx_apply_cmdline '{cmdline}'\n"
        + show("SLX_DNBD3_SERVERS", "SLX_DNBD3_IMAGE", "SLX_DNBD3_RID")
        + f"slx_cmdline_get slxbase '{cmdline}'; echo\nslx_cmdline_get slxsrv '{cmdline}'; echo\n"
        + f"slx_cmdline_get slxprot '{cmdline}' || echo no-slxprot",
        stdin="SLX_DNBD3_SERVERS='10.0.0.1'\nSLX_DNBD3_IMAGE='stage4/x.qcow2'\nSLX_DNBD3_RID='3'\n",
    ).stdout
    assert "SLX_DNBD3_SERVERS=[10.0.2.101 10.0.2.102]" in out
    assert "SLX_DNBD3_IMAGE=[stage4/x.qcow2]" in out
    assert "SLX_DNBD3_RID=[4]" in out
    assert out.splitlines()[-3:] == ["boot", "10.0.2.100", "no-slxprot"]


def test_server_list_default_port_and_forms() -> None:
    out = bash("slx_server_list '10.0.0.1  10.0.0.2:5004,host.example [::1]:7000 [fe80::1] ::2'").stdout
    assert out.split() == [
        "10.0.0.1:5003",
        "10.0.0.2:5004",
        "host.example:5003",
        "[::1]:7000",
        "[fe80::1]:5003",
        "[::2]:5003",
    ]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def servers(tmp_path: Path):
    """Two real DNBD3 servers on 127.0.0.1: A has revisions 1 and 2 of the image, B only revision 2."""
    stores = [tmp_path / "a", tmp_path / "b"]
    for store, rids in zip(stores, ((1, 2), (2,)), strict=True):
        (store / "stage4").mkdir(parents=True)
        for rid in rids:
            (store / "stage4" / f"img.qcow2.r{rid}").write_bytes(b"QFI\xfb" + bytes(8188))
    with DevServer(stores[0]) as a, DevServer(stores[1]) as b:
        yield [f"127.0.0.1:{a.address[1]}", f"127.0.0.1:{b.address[1]}"]


def test_first_server_that_has_the_revision_is_chosen(servers: list[str]) -> None:
    down = f"127.0.0.1:{_closed_port()}"
    a, b = servers
    assert bash(f"slx_pick_server stage4/img.qcow2 2 '{a} {b}'").stdout.strip() == a
    assert bash(f"slx_pick_server stage4/img.qcow2 2 '{down} {b} {a}'").stdout.strip() == b
    assert bash(f"slx_pick_server stage4/img.qcow2 1 '{b} {a}'").stdout.strip() == a  # B lacks revision 1
    assert bash(f"slx_server_order {b} '{down} {a} {b}'").stdout.split() == [b, down, a]


def test_missing_revision_and_no_server_are_one_line_each(servers: list[str]) -> None:
    down = f"127.0.0.1:{_closed_port()}"
    a, b = servers
    missing = bash(f"slx_pick_server stage4/img.qcow2 9 '{a} {b}'", check=False)
    assert missing.returncode == 1
    assert (
        missing.stdout == f"stage4: revision 9 of stage4/img.qcow2 missing on every server (tried {a} {b})\n"
    )
    nobody = bash(f"slx_pick_server stage4/img.qcow2 2 '{down}'", check=False)
    assert nobody.returncode == 1
    assert nobody.stdout == f"stage4: no DNBD3 server answered for stage4/img.qcow2 (tried {down})\n"
    unknown = bash(f"slx_pick_server stage4/other.qcow2 2 '{a}'", check=False)
    assert unknown.stdout == f"stage4: no DNBD3 server answered for stage4/other.qcow2 (tried {a})\n"


def _gpt_disk(path: Path, parts: list[tuple[str, str | None]]) -> None:
    """A GPT disk file; each partition (GPT name, ext4 label or None for no filesystem) is 8 MiB."""
    size_mib = 2 + 8 * len(parts) + 1
    subprocess.run(["truncate", "-s", f"{size_mib}M", path], check=True)
    script = "label: gpt\n" + "".join(
        f'start={2048 + i * 16384}, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="{name}"\n'
        for i, (name, _) in enumerate(parts)
    )
    subprocess.run(["sfdisk", "-q", path], input=script, text=True, check=True)
    for i, (_, label) in enumerate(parts):
        if label is not None:
            subprocess.run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    label,
                    "-E",
                    f"offset={(2048 + i * 16384) * 512}",
                    path,
                    "8M",
                ],
                check=True,
            )


@pytest.fixture
def attach():
    if os.geteuid() != 0 or not all(
        shutil.which(t) for t in ("losetup", "partx", "sfdisk", "blkid", "mkfs.ext4")
    ):
        pytest.skip("needs root, losetup, partx, sfdisk, blkid and mkfs.ext4 (real partition devices)")
    attached: list[str] = []

    def attach_file(path: Path) -> str:
        device = subprocess.run(
            ["losetup", "-f", "--show", path], capture_output=True, text=True, check=True
        ).stdout.strip()
        attached.append(device)
        subprocess.run(["partx", "-a", device], check=True)
        return device

    yield attach_file
    for device in attached:
        subprocess.run(["partx", "-d", device], check=False)
        subprocess.run(["losetup", "-d", device], check=False)


def test_partition_by_gpt_name_before_label(tmp_path: Path, attach) -> None:
    disk = tmp_path / "name.raw"
    _gpt_disk(disk, [("bios_grub", None), ("data", "SLX_SYS"), ("SLX_SYS", "other")])
    device = attach(disk)
    assert bash(f"slx_pick_partition {device} SLX_SYS").stdout.strip() == f"{device}p3"


def test_partition_by_label_when_no_gpt_name_matches(tmp_path: Path, attach) -> None:
    disk = tmp_path / "label.raw"
    _gpt_disk(disk, [("ESP", None), ("root", "system")])
    device = attach(disk)
    assert bash(f"slx_pick_partition {device} system").stdout.strip() == f"{device}p2"
    missing = bash(f"slx_pick_partition {device} SLX_SYS", check=False)
    assert missing.returncode == 1
    assert missing.stdout == f"stage4: no partition named or labelled SLX_SYS on {device}\n"


def test_dracut_accepts_the_module(tmp_path: Path) -> None:
    """dracut lists the module and, where its tools are missing, names them instead of building without."""
    if not Path("/usr/lib/dracut/modules.d").is_dir() or not shutil.which("dracut"):
        pytest.skip("needs dracut (apt-get install dracut-core)")
    base = tmp_path / "dracut"
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    shutil.copytree(MODULE, base / "modules.d" / MODULE.name, symlinks=True)
    env = {**os.environ, "dracutbasedir": str(base)}
    listed = subprocess.run(
        ["dracut", "--list-modules", "--no-kernel"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "dnbd3-rootfs" in listed.stdout.split()
    if shutil.which("dnbd3-client") and shutil.which("xlosetup"):
        return
    refused = subprocess.run(
        [
            "dracut",
            "--no-kernel",
            "--no-hostonly",
            "--force",
            "-m",
            "bash dnbd3-rootfs",
            tmp_path / "initrd.img",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert refused.returncode != 0
    assert "command 'dnbd3-client' could not be found" in refused.stderr
    assert not (tmp_path / "initrd.img").exists()


def test_scripts_parse() -> None:
    for script in MODULE.glob("*.sh"):
        assert subprocess.run(["bash", "-n", script], capture_output=True, check=False).returncode == 0, (
            script
        )
    for script in (
        "parse-dnbd3root.sh",
        "dnbd3-generator.sh",
        "udhcpc-script.sh",
        "stage4-writable-stage4.sh",
        "stage4-writable-watch.sh",
    ):
        assert (
            subprocess.run(["sh", "-n", MODULE / script], capture_output=True, check=False).returncode == 0
        ), script
