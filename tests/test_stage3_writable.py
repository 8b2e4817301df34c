"""The writable layer of the stage-3 module (stage4-writable.sh): SLX_WRITABLE_DEVICE_PARTITION_TABLE parsed
and laid out on a partition of a given size, run on the host by bash (the device-mapper part runs only in
a guest: tests/test_netboot.py).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs"
MIB = 2048  # sectors
GIB = 1024 * MIB


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f". {MODULE / 'stage4-lib.sh'}\n. {MODULE / 'stage4-writable.sh'}\n{script}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def plan(table: str, sectors: int) -> list[tuple[str, str, int, int]]:
    result = run(f"slx_writable_plan {shlex.quote(table)} {sectors}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    rows = []
    for line in result.stdout.splitlines():
        words = line.split()
        if words[0] == "meta":
            rows.append(("meta", "", int(words[1]), int(words[2])))
        else:
            rows.append((words[0], words[1], int(words[2]), int(words[3])))
    return rows


def refused(table: str, sectors: int = 10 * GIB) -> str:
    """The one line a bad table gives (status 1, nothing else)."""
    result = run(f"slx_writable_plan {shlex.quote(table)} {sectors}")
    assert result.returncode == 1, result.stdout
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("stage4: ")
    return lines[0]


def check_layout(rows: list[tuple[str, str, int, int]], sectors: int) -> None:
    """Slices after the 1 MiB record, 1 MiB aligned, in order, not overlapping, inside the partition."""
    end = MIB
    for _, _, start, size in rows:
        assert start >= end and start % MIB == 0 and size % MIB == 0 and size > 0
        end = start + size
    assert end <= sectors


@pytest.mark.parametrize(
    ("size", "sectors"),
    [("1M", MIB), ("512K", 0), ("3G", 3 * GIB), ("2t", 2 * 1024 * GIB), ("1536K", MIB), ("50%", 5 * GIB)],
)
def test_sizes(size: str, sectors: int) -> None:
    result = run(f"slx_size_sectors {size} {10 * GIB}")
    assert result.returncode == 0 and result.stdout == f"{sectors}\n"


@pytest.mark.parametrize("size", ["0%", "101%", "12", "1.5G", "1GB", "G", "-1G", "1234567890M", "%"])
def test_sizes_refused(size: str) -> None:
    result = run(f"slx_size_sectors {shlex.quote(size)} {10 * GIB}")
    assert result.returncode == 1 and result.stdout == ""


def test_default_is_one_thin_snapshot_root_over_everything() -> None:
    sectors = 10 * GIB + 12345  # not a whole number of MiB
    rows = plan("", sectors)
    meta, root = rows
    assert meta == ("meta", "", MIB, 11 * MIB)  # 1/1024 of the rest, rounded up to 1 MiB
    assert root == ("thin-snapshot", "root", 12 * MIB, sectors // MIB * MIB - 12 * MIB)
    check_layout(rows, sectors)
    assert plan("", 1 * GIB)[0] == ("meta", "", MIB, 4 * MIB)  # at least 4 MiB of metadata


def test_usegalaxy_table_and_first_come_first_served() -> None:
    rows = plan("thin-snapshot root 50% 0\nlinear tank 50% 0\n", 10 * GIB)
    assert plan("thin-snapshot root 50% 0; linear tank 50% 0", 10 * GIB) == rows  # one config line
    assert [r[:2] for r in rows] == [("meta", ""), ("thin-snapshot", "root"), ("linear", "tank")]
    usable = 10 * GIB - MIB - rows[0][3]
    assert rows[1][3] == rows[2][3] == usable // 2 // MIB * MIB
    check_layout(rows, 10 * GIB)
    # Absolute sizes in order; the one that asks for more than is left gets the rest; comments ignored.
    table = "# site layout\nlinear scratch 6G\n\nsnapshot root 2G  # the COW\nthin-volume data 100%\n"
    rows = plan(table, 10 * GIB)
    assert [r[:2] for r in rows] == [
        ("meta", ""),
        ("linear", "scratch"),
        ("snapshot", "root"),
        ("thin-volume", "data"),
    ]
    assert rows[1][3] == 6 * GIB and rows[2][3] == 2 * GIB
    assert rows[3][2] + rows[3][3] == 10 * GIB  # the rest, to the end
    check_layout(rows, 10 * GIB)
    # Without thin lines there is no pool metadata.
    rows = plan("snapshot root 1G\nlinear tank 100%", 4 * GIB)
    assert rows == [("snapshot", "root", MIB, GIB), ("linear", "tank", MIB + GIB, 3 * GIB - MIB)]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("thin-snapshot root", "line 'thin-snapshot root': not '<type> <name> <size> [<crypt>]'"),
        ("thin-snapshot root 50% 0 extra", "not '<type> <name> <size> [<crypt>]'"),
        (
            "mirror root 50%",
            "line 'mirror root 50%': type 'mirror' is not thin-snapshot, thin-volume, snapshot",
        ),
        ("thin-snapshot root 50%\nlinear a/b 1G", "line 'linear a/b 1G': name 'a/b' is not letters"),
        ("thin-snapshot root 50%\nlinear stage4-pool 1G", "name 'stage4-pool'"),
        ("thin-snapshot root 50%\nlinear root 1G", "line 'linear root 1G': name 'root' is used twice"),
        (
            "thin-snapshot root 5X",
            "line 'thin-snapshot root 5X': size '5X' is not N followed by K, M, G or T",
        ),
        ("thin-snapshot root 150%", "size '150%' is not"),
        ("thin-snapshot root 100K", "size '100K' is less than 1 MiB"),
        ("thin-snapshot root 50% 1", "line 'thin-snapshot root 50% 1': encryption ('1') is not supported"),
        ("linear root 50%", "line 'linear root 50%': root must be a thin-snapshot or a snapshot"),
        (
            "linear tank 50%",
            "SLX_WRITABLE_DEVICE_PARTITION_TABLE has no thin-snapshot or snapshot named root",
        ),
        (
            "snapshot root 8G\nlinear a 2G\nlinear b 1G",
            "line 'linear b 1G': no space left (the lines before it took 10239 of 10239 MiB)",
        ),
    ],
)
def test_bad_table_is_one_line_naming_it(table: str, message: str) -> None:
    line = refused(table)
    assert message in line
    assert line.startswith("stage4: SLX_WRITABLE_DEVICE_PARTITION_TABLE ")


def test_partition_too_small() -> None:
    assert refused("", 4 * MIB) == "stage4: the writable partition (4 MiB) is too small for the layer"


def test_the_layer_checks_the_table_before_looking_for_a_disk() -> None:
    """A bad table stops the boot even when no disk is there (it is the site's mistake either way)."""
    result = run(
        "SLX_WRITABLE_DEVICE_IDENTIFIER=NOT_THERE SLX_WRITABLE_DEVICE_PARTITION_TABLE='linear root 1G' "
        "slx_writable_layer /dev/nothing img 1"
    )
    assert result.returncode == 1
    assert result.stdout == (
        "stage4: SLX_WRITABLE_DEVICE_PARTITION_TABLE line 'linear root 1G': "
        "root must be a thin-snapshot or a snapshot\n"
    )
    result = run(
        "SLX_WRITABLE_DEVICE_IDENTIFIER=X SLX_WRITABLE_DEVICE_IDENTIFIER_TIMEOUT_IN_SECONDS=ten "
        "slx_writable_layer /dev/nothing img 1"
    )
    assert result.returncode == 1
    assert (
        result.stdout == "stage4: SLX_WRITABLE_DEVICE_IDENTIFIER_TIMEOUT_IN_SECONDS 'ten' is not a number\n"
    )


# --- the watcher of stage 4 (stage4-writable-watch.sh): `dmsetup status` lines recorded in guests ------

WATCH = MODULE / "stage4-writable-watch.sh"
# The RAM layer of a 2 GiB guest: the 2.8 GiB root partition over a zram disk of 2060677120 bytes.
RAM_SNAPSHOT = "0 5908480 snapshot {}/4024760 {}"
# The default table on a 6 GiB disk: 6 MiB of pool metadata (1536 blocks of 4 KiB), 64 KiB data blocks.
THIN_POOL = "0 12566528 thin-pool 1 {}/1536 {}/98176 - rw discard_passdown queue_if_no_space - 1024"


def watch(script: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`script` after the watcher's functions, in dash (the watcher is POSIX sh, run by /bin/sh)."""
    return subprocess.run(
        ["dash", "-c", f"STAGE4_WATCH_FUNCTIONS_ONLY=1 . {WATCH}\n{script}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def usage(status: str) -> str:
    result = watch(f"slx_usage {shlex.quote(status)}")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        # a fresh RAM layer, then one at 85 %: sectors of 512 bytes
        (RAM_SNAPSHOT.format(17424, 64), f"0 {17424 * 512} 2060677120 snapshot COW\n"),
        (RAM_SNAPSHOT.format(3421064, 13376), f"85 {3421064 * 512} 2060677120 snapshot COW\n"),
        # a thin pool: data blocks of 12566528 / 98176 = 128 sectors, metadata blocks of 4 KiB
        (THIN_POOL.format(301, 49088), f"50 {49088 * 65536} {98176 * 65536} thin-pool data\n"),
        # the metadata fuller than the data: that is what fills the pool first
        (THIN_POOL.format(1383, 49088), f"90 {1383 * 4096} {1536 * 4096} thin-pool metadata\n"),
        (THIN_POOL.format(1536, 49088), f"100 {1536 * 4096} {1536 * 4096} thin-pool metadata\n"),
        # overflowed or failed: writes already fail
        ("0 5908480 snapshot Invalid", "failed snapshot Invalid\n"),
        ("0 5908480 snapshot Overflow", "failed snapshot Overflow\n"),
        ("0 12566528 thin-pool Fail", "failed thin-pool Fail\n"),
        # nothing to measure: zero totals, other targets and states, no status at all
        ("0 5908480 snapshot 0/0 0", ""),
        ("0 0 thin-pool 0 0/0 0/0 - rw discard_passdown queue_if_no_space - 0", ""),
        ("0 5908480 snapshot Merge failed", ""),
        ("0 5908480 thin 1048576 5908479", ""),
        ("0 2048 linear", ""),
        ("", ""),
    ],
)
def test_usage_of_recorded_status_lines(status: str, expected: str) -> None:
    assert usage(status) == expected


def rounds(name: str, statuses: list[str], fails: str = "/") -> list[list[str]]:
    """The lines slx_watch_check prints in each round (one status per round), the level carried over."""
    script = "level=0\n" + "".join(
        f'slx_watch_check {name} "$level" {shlex.quote(status)} {shlex.quote(fails)}; '
        'level=$SLX_WATCH_LEVEL; echo "-- $level"\n'
        for status in statuses
    )
    result = watch(script)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out, current = [], []
    for line in result.stdout.splitlines():
        if line.startswith("-- "):
            out.append(current)
            current = []
        else:
            current.append(line)
    return out


def test_each_mark_once_per_crossing() -> None:
    """80 % and 95 % each print one line when crossed upwards, not again while the layer stays above the
    mark, and again after it went below it (a thin pool that got space back)."""
    percents = [10, 79, 81, 85, 90, 96, 99, 50, 83, 83, 100]
    lines = rounds(
        "stage4-pool", [THIN_POOL.format(100, p * 98176 // 100) for p in percents], "/ and /dev/mapper/tank"
    )
    marks = [[line.split(", over ")[1].split(" %")[0] for line in round_lines] for round_lines in lines]
    assert marks == [[], [], ["80"], [], [], ["95"], [], [], ["80"], [], ["95"]]
    assert lines[2] == [
        f"<3>stage4-writable: warning: the writable layer /dev/mapper/stage4-pool (thin-pool data) is 80 % "
        f"full, over 80 %: {81 * 98176 // 100 * 65536} of {98176 * 65536} bytes used; at 100 % writes to / "
        "and /dev/mapper/tank fail"
    ]
    assert lines[5][0].startswith("<2>stage4-writable: warning: ")  # 95 %: critical
    # A jump past both marks in one interval: both lines, in order.
    jump = rounds("root", [RAM_SNAPSHOT.format(40000, 64), RAM_SNAPSHOT.format(3900000, 15000)])
    assert [line[:3] for line in jump[1]] == ["<3>", "<2>"]
    assert "(snapshot COW) is 96 % full, over 95 %" in jump[1][1] and "writes to / fail" in jump[1][1]


def test_an_invalid_snapshot_once_and_zero_totals_change_nothing() -> None:
    lines = rounds(
        "root",
        [
            RAM_SNAPSHOT.format(3500000, 13000),
            "0 5908480 snapshot Invalid",
            "0 5908480 snapshot Invalid",
        ],
    )
    assert [len(round_lines) for round_lines in lines] == [1, 1, 0]
    assert lines[1] == [
        "<2>stage4-writable: the writable layer /dev/mapper/root is full or failed (snapshot Invalid): "
        "writes to / fail"
    ]
    # A status without totals keeps the level it had: no line, and none again when the usage is back.
    result = watch(
        f'slx_watch_check root 80 {shlex.quote("0 5908480 snapshot 0/0 0")} /; echo "$SLX_WATCH_LEVEL"\n'
        f"slx_watch_check root 80 {shlex.quote(RAM_SNAPSHOT.format(3421064, 13376))} /; "
        'echo "$SLX_WATCH_LEVEL"'
    )
    assert result.stdout == "80\n80\n"


def test_without_dmsetup_the_watcher_says_so_in_one_line(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    result = subprocess.run(
        ["/bin/sh", WATCH],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": str(tmp_path), "STAGE4_KMSG": str(kmsg)},
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert kmsg.read_text() == (
        "<3>stage4-writable: no dmsetup in this system (package dmsetup or device-mapper): the writable "
        "layer is not watched, no warning before it is full\n"
    )
