"""`stage4 netboot`: the rewriting of the client's command line and config (fast), and end to end (slow):
a layered build with the real dnbd3 and xloop, exported, booted in qemu over HTTP and DNBD3 on 127.0.0.1.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stage4.boot import guest_network, netboot, qemu
from stage4.dnbd3.client import Client
from stage4.dnbd3.server import DevServer
from stage4.errors import InputError, StepFailed
from tests.archives import tgz
from tests.conftest import BuiltImage, full_matrix, seed_steps, session_cache

MODULE_LIB = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs/stage4-lib.sh"
FILL = Path(__file__).resolve().parent / "fixtures/writable-fill"

IPXE = """#!ipxe
kernel http://${slxsrv}/${slxbase}/kernel.r3 initrd=initrd.r3 \
slxsrv=${slxsrv} slxbase=${slxbase} SLX_DNBD3_RID=3
initrd http://${slxsrv}/${slxbase}/initrd.r3
boot
"""

PUBLISHED = """SLX_DNBD3_SERVERS='10.0.0.1 10.0.0.2:5004'
SLX_DNBD3_IMAGE='stage4/debian-12.qcow2'
SLX_DNBD3_RID='3'
SLX_SYSTEM_PARTITION_IDENTIFIER='SLX_SYS'
"""


def test_kernel_command_line_from_the_ipxe_entry() -> None:
    entry = netboot.parse_ipxe(IPXE)
    assert entry.kernel_url == "http://${slxsrv}/${slxbase}/kernel.r3"
    assert entry.initrd_url == "http://${slxsrv}/${slxbase}/initrd.r3"
    assert netboot.kernel_command_line(entry, "10.0.2.100", "boot") == (
        "initrd=initrd.r3 slxsrv=10.0.2.100 slxbase=boot SLX_DNBD3_RID=3 console=ttyS0,115200n8"
    )


def test_kernel_args_go_last_on_the_command_line() -> None:
    entry = netboot.parse_ipxe(IPXE, "ipxe.r3")
    line = qemu.with_kernel_args(
        netboot.kernel_command_line(entry, "10.0.2.100", "boot"), ("rd.debug", "a=b")
    )
    assert line.endswith(" console=ttyS0,115200n8 rd.debug a=b"), line
    assert qemu.with_kernel_args("root=x", ()) == "root=x"
    for bad in ("", "a b", "tab\there", "ünïcode"):
        with pytest.raises(InputError, match="expected one kernel argument"):
            qemu.with_kernel_args("root=x", (bad,))
    assert len(qemu.with_kernel_args("", ("x" * qemu.COMMAND_LINE_MAX,))) == qemu.COMMAND_LINE_MAX
    with pytest.raises(InputError, match="2048 bytes, more than the kernel's 2047"):
        qemu.with_kernel_args("", ("x" * 2048,))


def test_bootif_names_the_boot_nic_as_stage_3_reads_it() -> None:
    """The exported entry's BOOTIF=01-${mac:hexhyp} (and a menu's 01-${mac}) becomes the MAC of the NIC
    with the user network; the other NIC, before it, gets no DHCP and only a listener on 127.0.0.1."""
    for form in ("${mac:hexhyp}", "${mac}"):
        entry = netboot.parse_ipxe(IPXE.replace("SLX_DNBD3_RID=3", f"BOOTIF=01-{form}"))
        bootif = netboot.kernel_command_line(entry, "10.0.2.100", "boot").split("BOOTIF=")[1].split()[0]
        read = subprocess.run(
            ["bash", "-c", f'. {MODULE_LIB}; . {MODULE_LIB.parent / "stage4-net.sh"}; slx_bootif_mac "$1"']
            + ["_", bootif],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert read == netboot.BOOT_MAC + "\n", form
    spec = qemu.BootSpec(
        None, "tcg", 1, 512, Path("log"), nic="user,mac=x", other_nics=("socket,listen=127.0.0.1:9",)
    )
    argv = qemu.build_argv(spec, "nonce")
    nics = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-nic"]
    assert nics == ["socket,listen=127.0.0.1:9", "user,mac=x"]


def test_guests_reach_only_their_forwards() -> None:
    """restrict=on: neither a booted nor a netbooted guest has NAT to the host's networks (its DNS, NTP
    or apt would leave the machine); a netbooted one reaches its forwards to 127.0.0.1 only."""
    argv = qemu.build_argv(qemu.BootSpec(None, "tcg", 1, 512, Path("log")), "nonce")
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "-nic"] == [
        "user,model=virtio-net-pci,restrict=on"
    ]
    relay = guest_network.Relay(("127.0.0.1", 9))
    try:
        nic = netboot.Forwards(relay, [relay], Path("bridge.py")).nic()
    finally:
        relay.close()
    user, *forwards = nic.split(",guestfwd=")
    assert user.endswith(",restrict=on") and len(forwards) == 2, nic


def test_ipxe_entry_errors_are_one_line() -> None:
    with pytest.raises(InputError, match="needs a 'kernel URL ARGS...' and an 'initrd URL' line"):
        netboot.parse_ipxe("#!ipxe\nboot\n", "ipxe.r3")
    entry = netboot.parse_ipxe(IPXE.replace("SLX_DNBD3_RID=3", "x=${serial}"))
    with pytest.raises(InputError, match=r"\$\{serial\}"):
        netboot.kernel_command_line(entry, "10.0.2.100", "boot")


def test_guest_config_names_only_the_forwarded_servers() -> None:
    guest = netboot.guest_config(PUBLISHED, netboot.guest_servers(2))
    assert guest.splitlines() == ["SLX_DNBD3_SERVERS='10.0.2.101 10.0.2.102'", *PUBLISHED.splitlines()[1:]]
    assert "10.0.0." not in guest
    # what the module reads out of it
    out = subprocess.run(
        ["bash", "-c", f'. {MODULE_LIB}; slx_parse_config; echo "$SLX_DNBD3_SERVERS|$SLX_DNBD3_RID"'],
        input=guest,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "10.0.2.101 10.0.2.102|3\n"
    missing = netboot.guest_config("SLX_DNBD3_IMAGE='x'\n", ["10.0.2.101"])
    assert missing == "SLX_DNBD3_SERVERS=10.0.2.101\nSLX_DNBD3_IMAGE='x'\n"
    twice = netboot.guest_config("SLX_DNBD3_SERVERS=a\nexport SLX_DNBD3_SERVERS='b'\n", ["10.0.2.101"])
    assert twice == "SLX_DNBD3_SERVERS=10.0.2.101\n"


def test_only_loopback_servers() -> None:
    assert netboot.loopback_server("127.0.0.1:5003") == ("127.0.0.1", 5003)
    assert netboot.loopback_server("localhost:7000") == ("127.0.0.1", 7000)
    assert netboot.loopback_server("[::1]:7000") == ("::1", 7000)
    for remote in ("10.0.0.1:5003", "dnbd3.example.org", "192.168.1.2"):
        with pytest.raises(InputError, match="DNBD3 servers on this machine only"):
            netboot.loopback_server(remote)


def test_relay_counts_what_the_client_reads(tmp_path: Path) -> None:
    (tmp_path / "stage4").mkdir()
    (tmp_path / "stage4" / "img.qcow2.r1").write_bytes(b"QFI\xfb" + bytes(65532))
    with DevServer(tmp_path) as server:
        relay = guest_network.Relay(server.address).start()
        try:
            with Client.open(f"127.0.0.1:{relay.port}", "stage4/img.qcow2", 1, timeout=10) as client:
                assert client.read(0, 4096)[:4] == b"QFI\xfb"
                client.read(4096, 8192)
                with relay._lock:
                    relayed = list(relay._sockets)
                # Both ends send without Nagle's delay: with it, the tail of each reply waited for a
                # delayed ACK (40 ms per DNBD3 request in a netboot).
                assert len(relayed) == 2
                assert all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in relayed)
            # reply headers (16 bytes each) and payloads: handshake + 4096 + 8192
            assert relay.bytes_to_guest > 4096 + 8192
            assert relay.bytes_to_guest < 4096 + 8192 + 200
        finally:
            relay.close()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        down = guest_network.Relay(("127.0.0.1", dead)).start()
        try:
            with socket.create_connection(("127.0.0.1", down.port), timeout=5) as sock:
                assert sock.recv(1) == b""  # a server that is down: the connection ends
        finally:
            down.close()


def test_bridge_sends_to_the_guest_without_delay(tmp_path: Path) -> None:
    """qemu runs the bridge with its end of the guest's connection, a TCP socket on loopback, as stdin and
    stdout. The bridge turns Nagle's algorithm off on it: with it on, the tail of a reply that arrived in
    two parts waited for qemu's delayed ACK, 40 ms, about once in six DNBD3 requests of a netboot."""
    bridge = tmp_path / "bridge.py"
    bridge.write_text(guest_network.BRIDGE, encoding="utf-8")
    with socket.create_server(("127.0.0.1", 0)) as upstream, socket.create_server(("127.0.0.1", 0)) as pair:
        upstream.settimeout(10)  # a bridge that fails to start fails the test instead of hanging it
        qemu_end = socket.create_connection(pair.getsockname(), timeout=10)
        bridge_end, _ = pair.accept()
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(bridge), str(upstream.getsockname()[1])],
            stdin=bridge_end,
            stdout=bridge_end,
        )
        try:
            server, _ = upstream.accept()
            with server, qemu_end:
                qemu_end.sendall(b"request")
                assert server.recv(100) == b"request"
                server.sendall(b"head")
                server.sendall(b"tail")
                received = b""
                while len(received) < 8:
                    received += qemu_end.recv(100)
                assert received == b"headtail"
                # the socket the bridge got is this one: its options are the bridge's
                assert bridge_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            bridge_end.close()
            process.wait(timeout=10)
    assert process.returncode == 0


def test_revision_lookup_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "stage4").mkdir()
    with pytest.raises(InputError, match="no revision in the store"):
        netboot.find_revision(tmp_path, "stage4/img.qcow2", None, None)
    (tmp_path / "stage4" / "img.qcow2.r2").write_bytes(bytes(4096))
    with pytest.raises(InputError, match=r"no revision 5 in the store .* \(revisions: 2\)"):
        netboot.find_revision(tmp_path, "stage4/img.qcow2", 5, None)
    boot = tmp_path / ".stage4" / "stage4" / "img.qcow2"
    boot.mkdir(parents=True)
    for kind in ("kernel", "initrd", "config"):
        (boot / f"{kind}.r2").write_text(kind)
    with pytest.raises(InputError, match=r"ipxe\.r2: missing"):
        netboot.find_revision(tmp_path, "stage4/img.qcow2", None, None)
    (boot / "ipxe.r2").write_text(IPXE)
    assert netboot.find_revision(tmp_path, "stage4/img.qcow2", None, None).ipxe == boot / "ipxe.r2"


GOOD = {
    "source": "/dev/mapper/root",
    "dm": "root",
    "slaves": "xloop0p3,zram0",
    "xloop0": "/dev/dnbd0",
    "dnbd0": "stage4/debian-12.qcow2:3@10.0.2.102:5003",
}


def test_root_check() -> None:
    assert "xloop0 over /dev/dnbd0" in netboot.check_root(GOOD, "stage4/debian-12.qcow2", 3)
    bad = [
        ({**GOOD, "dm": None}, "not a device-mapper device"),
        ({**GOOD, "slaves": "vda3"}, "is not over an xloop partition and a RAM disk"),
        ({**GOOD, "xloop0": "/root/file.qcow2"}, "backed by /root/file.qcow2"),
        ({**GOOD, "dnbd0": "stage4/debian-12.qcow2:2@10.0.2.101:5003"}, "not stage4/debian-12.qcow2:3"),
        ({}, "no STAGE4-ROOT line"),
    ]
    for facts, message in bad:
        facts = {k: v for k, v in facts.items() if v is not None}
        with pytest.raises(StepFailed, match=message):
            netboot.check_root(facts, "stage4/debian-12.qcow2", 3)


# --- end to end: real dnbd3 + xloop, a layered build, export, netboot in qemu (TCG here) ---------------

NAME = "stage4/netboot-e2e.qcow2"


def publish(work: Path, base: BuiltImage, name: str, extra: str = "") -> dict:
    """A layered build on the session's base (seeded into its own output folder) with the default
    components (dnbd3, xloop) and the shipped dnbd3-rootfs module, exported as revision 1 of `name` into
    a fresh store; `extra`: more TOML for the image."""
    from tests.upstream import SHARED_CACHE, require_upstream

    require_upstream(SHARED_CACHE)
    image = "debian-12"  # the base's name (its hostname)
    seed_steps(base.path.parent, work / "output" / image)
    project = work / "stage4.toml"
    # One vCPU per client: the pair test boots two TCG guests at once, on a host that may have two cores.
    # A cache of its own: the build runs beside the other worker's builds.
    cache = session_cache(f"netboot-{work.name}")
    project.write_text(
        f'[machine]\ncpus = 1\ndisk_size = "3G"\n\n'  # disk_size: as the base was built (conftest)
        f'[build]\noutput_dir = "{work / "output"}"\ncache_dir = "{cache}"\n\n'
        f'[images.{image}]\ndistribution = "debian-12"\n{extra}\n'
        f"[images.{image}.dev]\n[images.{image}.prod]\n"
    )
    built = stage4(project, "build", image)
    assert f"{image}: base {base.manifest['identity'][:16]} is up to date, reusing it" in built.stderr
    store = work / "store"
    store.mkdir()
    # A site config.tgz: the guest's marker script reports the file it unpacks (site=...), and the test
    # unit that fills the writable layer before the marker (tests/fixtures/writable-fill).
    site = tgz(
        work / "site.tgz",
        {
            "etc/stage4-site": b"netboot-e2e\n",
            "etc/systemd/system/stage4-fill.service": (FILL / "stage4-fill.service").read_bytes(),
            "usr/local/lib/stage4-fill.sh": (FILL / "stage4-fill.sh").read_bytes(),
        },
        {"etc/systemd/system/multi-user.target.wants/stage4-fill.service": "../stage4-fill.service"},
    )
    # The config names the site's servers: netboot must never contact them.
    stage4(
        project,
        "export",
        work / "output" / image / "prod.qcow2",
        "--config-tgz",
        site,
        "--store",
        store,
        "--name",
        name,
        "--server",
        "192.0.2.10",
        "--server",
        "192.0.2.11:5004",
    )
    return {"project": project, "store": store, "boot": store / ".stage4" / name, "work": work}


@pytest.fixture(scope="session")
def published(base_image: BuiltImage, tmp_path_factory) -> dict:
    """netboot-e2e, revision 1, for every end-to-end test of this file."""
    return publish(tmp_path_factory.mktemp("netboot"), base_image, NAME)


def stage4(project: Path, *args, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "stage4", "-c", str(project), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    return result


def fill_report(serial_log: str) -> dict[str, str]:
    """The STAGE4-FILL line of the site's fill unit (tests/fixtures/writable-fill): its KEY=value words
    and its result ("ok" or "failed (why)")."""
    lines = [line for line in serial_log.splitlines() if "STAGE4-FILL " in line]
    assert lines, "the fill unit printed no STAGE4-FILL line"
    line = lines[-1]
    words, result = line.split("STAGE4-FILL ")[1].split(" result=")
    return {**dict(word.split("=", 1) for word in words.split()), "result": result.strip()}


def _boot_dir_variant(published: dict, name: str, ipxe=None, config=None) -> Path:
    """A copy of the revision's boot files with one of them changed (what a misconfigured site serves)."""
    import shutil

    variant = published["work"] / name
    shutil.copytree(published["boot"], variant)
    if ipxe:
        (variant / "ipxe.r1").write_text(ipxe((variant / "ipxe.r1").read_text()))
    if config:
        (variant / "config.r1").write_text(config((variant / "config.r1").read_text()))
    return variant


@pytest.mark.slow
def test_initramfs_holds_the_module_and_the_tools(published: dict) -> None:
    listing = subprocess.run(
        ["lsinitrd", published["boot"] / "initrd.r1"], capture_output=True, text=True, check=True
    ).stdout
    for path in (
        "sbin/dnbd3root",
        "lib/stage4-lib.sh",
        "lib/stage4-net.sh",
        "sbin/stage4-handover",
        "pre-pivot/50-stage4-pre-pivot.sh",
        "dnbd3-client",
        "xlosetup",
        "dmsetup",
        "busybox",
        "extra/dnbd3.ko",
        "extra/xloop.ko",
        "extra/xloop_file_fmt_qcow.ko",
        "dm-snapshot.ko",
        "dm-thin-pool.ko",
        "zram.ko",
        "virtio_net.ko",
        "virtio_blk.ko",
        "lib/stage4-writable.sh",
        "lib/stage4-writable-stage4.sh",
        "lib/stage4-writable-watch.sh",
    ):
        assert path in listing, path


@pytest.mark.slow
def test_wrong_revision_stops_with_its_console_line(published: dict) -> None:
    boot = _boot_dir_variant(
        published, "rid9", ipxe=lambda text: text.replace("SLX_DNBD3_RID=1", "SLX_DNBD3_RID=9")
    )
    result = stage4(
        published["project"],
        "netboot",
        published["store"],
        NAME,
        "--boot-dir",
        boot,
        check=False,
        timeout=900,
    )
    assert result.returncode == 1, result.stderr
    line = f"stage4: revision 9 of {NAME} missing on every server (tried 10.0.2.101:5003)"
    assert line in result.stderr
    assert len([x for x in result.stderr.splitlines() if "error:" in x]) == 1


@pytest.mark.slow
def test_an_initramfs_stuck_in_emergency_target_fails_at_once(published: dict) -> None:
    """An initramfs that cannot even start its emergency shell (an archive appended by the site turned the
    /lib symlink into an empty directory) reaches systemd's emergency.target and restarts the failing shell
    forever. The netboot fails at that line, naming the units that failed first, not at its timeout."""
    boot = _boot_dir_variant(published, "broken-initrd")
    overlay = published["work"] / "broken-overlay"
    (overlay / "lib").mkdir(parents=True)
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], input=b"lib\n", cwd=overlay, capture_output=True, check=True
    ).stdout
    # Compressed like the initramfs before it: the kernel unpacks the archives in order, the last entry wins
    # (an uncompressed one would have to start on a 4-byte boundary).
    packed = subprocess.run(["zstd", "-q", "-c"], input=archive, capture_output=True, check=True).stdout
    with (boot / "initrd.r1").open("ab") as initrd:
        initrd.write(packed)
    serial = published["work"] / "broken-initrd.log"
    argv = ("netboot", published["store"], NAME, "--boot-dir", boot, "--timeout", 300, "--log", serial)
    result = stage4(published["project"], *argv, check=False, timeout=900)
    assert result.returncode == 1, result.stderr
    # Without the emergency.target line this waits out the 300 s and names the missing marker instead.
    [line] = [x for x in result.stderr.splitlines() if "error:" in x]
    assert "boot failed: the guest entered an emergency shell after " in line, line
    assert "systemd-journald.service" in line.split(" after ", 1)[1], line
    assert "…" not in line, line  # the console's shortened names, where the kernel log has whole ones
    assert "Reached target emergency.target" in serial.read_text(errors="replace")


@pytest.mark.slow
def test_a_kernel_argument_reaches_stage_3(published: dict) -> None:
    """--kernel-arg puts a word on the client's command line: the kernel prints it, and stage 3 reads its
    rd.stage4.* settings from there (a bad one stops the boot in the initramfs, within seconds)."""
    serial = published["work"] / "kernel-arg.log"
    argv = (
        "netboot",
        published["store"],
        NAME,
        "--kernel-arg",
        "rd.stage4.dhcp_timeout=soon",
        "--log",
        serial,
    )
    result = stage4(published["project"], *argv, check=False, timeout=900)
    assert result.returncode == 1, result.stderr
    assert "stage4: rd.stage4.dhcp_timeout=soon is not a whole number" in result.stderr
    [command_line] = re.findall(r"Command line: (.*)", serial.read_text(errors="replace"))
    assert command_line.strip().endswith("console=ttyS0,115200n8 rd.stage4.dhcp_timeout=soon"), command_line


@pytest.mark.slow
def test_wrong_identifier_stops_with_its_console_line(published: dict) -> None:
    boot = _boot_dir_variant(
        published,
        "ident",
        config=lambda text: text.replace(
            "SLX_SYSTEM_PARTITION_IDENTIFIER='SLX_SYS'", "SLX_SYSTEM_PARTITION_IDENTIFIER='NOT_THERE'"
        ),
    )
    assert "NOT_THERE" in (boot / "config.r1").read_text()
    result = stage4(
        published["project"],
        "netboot",
        published["store"],
        NAME,
        "--boot-dir",
        boot,
        check=False,
        timeout=900,
    )
    assert result.returncode == 1, result.stderr
    assert "stage4: no partition named or labelled NOT_THERE on /dev/xloop0" in result.stderr


@pytest.mark.slow
def test_two_clients_at_once_reach_userspace_on_dnbd3_one_falls_back(published: dict, tmp_path: Path) -> None:
    """Two clients boot the revision at the same time (each boot is minutes under TCG, so one pair serves
    every check): one from the development server `stage4 netboot` starts for the store; the other from
    a server list whose first entry is down, so it must fall back to the second: a real dnbd3-server
    acting as a replicating proxy (`isProxy=true`) of a real primary dnbd3-server whose basePath is the
    store (tests/dnbd3_servers.py). The proxy clones the revision from the primary when the client asks
    for it and copies every block in the background: its copy must equal the published file."""
    import sys

    from stage4.fsutil import sha256_file
    from tests.dnbd3_servers import reference_crc, replica, running, server_binary

    binary = server_binary()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    base = [sys.executable, "-m", "stage4", "-c", str(published["project"]), "netboot"]
    (tmp_path / "proxy-store").mkdir()
    with (
        running(binary, tmp_path / "primary", published["store"]) as primary,
        running(binary, tmp_path / "proxy", tmp_path / "proxy-store", uplink=primary) as proxy,
    ):
        argvs = [
            [*base, str(published["store"]), NAME, "--timeout", "1200"],
            [
                *base,
                str(published["store"]),
                NAME,
                "--server",
                f"127.0.0.1:{down}",
                "--server",
                proxy.address,
                "--timeout",
                "1200",
            ],
        ]
        clients = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in argvs
        ]
        outputs = [client.communicate(timeout=1500) for client in clients]
        for client, (_, err) in zip(clients, outputs, strict=True):
            assert client.returncode == 0, err[-2000:]
        # the guest's second server (10.0.2.102, asserted below) is the proxy
        assert f" from 127.0.0.1:{down} {proxy.address}: " in outputs[1][0]
        copy = replica(proxy, NAME, 1, timeout=300)
        published_file = published["store"] / f"{NAME}.r1"
        assert sha256_file(copy) == sha256_file(published_file)
        # The export's .crc: what dnbd3-server's own generator writes, served by the primary (the proxy
        # stores the list it got with GET_CRC32), and no block failed its check on either server.
        crc = published_file.with_name(published_file.name + ".crc").read_bytes()
        assert reference_crc(binary, published_file, tmp_path / "crc") == crc
        assert copy.with_name(copy.name + ".crc").read_bytes() == crc
        for server in (primary, proxy):
            assert "Hash check for block" not in server.log_text(), server.log
    for out, _ in outputs:
        assert "netbooted stage4/netboot-e2e.qcow2:1" in out
        assert "/ = /dev/mapper/root (dm root: xloop0p3 + zram0), xloop0 over /dev/dnbd0" in out
        read = int(out.split("read ")[1].split(" bytes")[0])
        assert 0 < read < (published["store"] / f"{NAME}.r1").stat().st_size
        # no local disk, no identifier configured: the RAM layer, and stage 3 said why
        assert "  writable layer: RAM (/dev/zram0), snapshot, " in out
        assert "; no SLX_WRITABLE_DEVICE_IDENTIFIER set; / " in out
    (own, _), (fallback, _) = outputs
    log = Path(own.split("serial log: ")[-1].strip())
    text = log.read_text(errors="replace")
    assert "STAGE4-ROOT source=/dev/mapper/root dm=root" in text
    # what stage 3 handed over, as stage 4 sees it: /opt/openslx/config (sourced by sh), the site's
    # config.tgz unpacked, the boot NIC named by BOOTIF (the NIC before it gets no DHCP)
    for log_text in (text, Path(fallback.split("serial log: ")[-1].strip()).read_text(errors="replace")):
        facts = netboot.root_facts_of(log_text)
        assert facts.get("openslx_rid") == "1", facts
        assert facts.get("site") == "netboot-e2e", facts
        assert facts.get("netroot") == netboot.BOOT_MAC, facts
    assert "192.0.2." not in text.split("STAGE4-ROOT")[-1]  # the site's servers were never used
    assert "@10.0.2.101:5003" in own
    assert "@10.0.2.102:5003" in fallback  # the guest's address of the second server
    # The site's fill unit took the RAM layer's COW to 85 %: the watcher warned once, at 80 %, not at 95 %.
    fill = fill_report(text)
    assert fill["layer"] == "ram" and fill["warned"] == "yes" and fill["result"] == "ok", fill
    allocated, total = map(int, fill["cow"].split("/"))
    assert 0.8 <= allocated / total < 0.95, fill
    warnings = {
        line.split("stage4-writable: warning: ")[1]
        for line in text.splitlines()
        if "writable: warning: " in line
    }
    assert len(warnings) == 1, warnings
    assert re.fullmatch(
        r"the writable layer /dev/mapper/root \(snapshot COW\) is 8\d % full, over 80 %: \d+ of "
        rf"{total * 512} bytes used; at 100 % writes to / fail",
        warnings.pop().strip(),
    )


@pytest.mark.slow
@full_matrix
def test_a_desktop_revision_netboots_to_its_greeter(base_image: BuiltImage, tmp_path: Path) -> None:
    """An Xfce image over DNBD3 and xloop, as a lab PC boots it: LightDM active and its greeter on screen."""
    from tests.readback import check_screenshot

    name = "stage4/netboot-xfce.qcow2"
    published = publish(tmp_path, base_image, name, 'desktop = { session = "xfce" }\n')
    shot = tmp_path / "greeter.png"
    result = stage4(
        published["project"], "netboot", published["store"], name, "--screenshot", shot, "--timeout", "1500"
    )
    assert "/ = /dev/mapper/root (dm root: xloop0p3 + zram0), xloop0 over /dev/dnbd0" in result.stdout
    log = Path(result.stdout.split("serial log: ")[-1].strip()).read_text(errors="replace")
    assert "STAGE4-DISPLAY-MANAGER lightdm.service active" in log
    check_screenshot(shot)


@pytest.mark.slow
def test_activation_moves_clients_of_the_active_entry(published: dict) -> None:
    """Clients that boot from the active entry `<boot-dir>/ipxe` follow `--activate`: the active entry
    boots the activated revision (not the newest), and the next activation moves the next boot to the new
    revision. Its own store (the revisions of `published` stay as the other tests expect them); the same
    prod image exported again each time."""
    work = published["work"]
    store, image = work / "active-store", work / "output" / "debian-12" / "prod.qcow2"
    store.mkdir()
    boot = store / ".stage4" / NAME

    def export(*options: str) -> None:
        stage4(published["project"], "export", image, "--store", store, "--name", NAME, *options)

    def netboot_active() -> tuple[str, str]:
        result = stage4(published["project"], "netboot", store, NAME, "--active", "--timeout", "1200")
        log = Path(result.stdout.split("serial log: ")[-1].strip()).read_text(errors="replace")
        command_line = next(line for line in log.splitlines() if "Command line:" in line)
        return result.stdout, command_line

    export("--server", "192.0.2.10", "--activate")  # r1, active
    export("--server", "192.0.2.10")  # r2, newest but not active
    out, command_line = netboot_active()
    assert f"/dev/dnbd0 = {NAME}:1@10.0.2.101:5003" in out, out
    assert "SLX_DNBD3_RID" not in command_line and "initrd=initrd.r1 " in command_line, command_line
    export("--server", "192.0.2.10", "--activate")  # r3, active: the clients of the entry move
    assert "SLX_DNBD3_RID='3'" in (boot / "config").read_text()
    out, command_line = netboot_active()
    assert f"/dev/dnbd0 = {NAME}:3@10.0.2.101:5003" in out, out
    assert "SLX_DNBD3_RID" not in command_line and "initrd=initrd.r3 " in command_line, command_line


@pytest.mark.slow
def test_a_local_disk_holds_the_writable_layer(published: dict) -> None:
    """One client with a new 6 GiB local disk (GPT partition OPENSLX_SYS): / is a thin snapshot of the
    xloop root partition in a thin pool on /dev/vda1, larger than the image's root, and stage 4 grew the
    file system into it: the site's fill unit wrote a file of 1.5 times the image's free space."""
    result = stage4(
        published["project"], "netboot", published["store"], NAME, "--local-disk", "6G", "--timeout", "1200"
    )
    out = result.stdout
    assert "/ = /dev/mapper/root (dm root: " in out and "xloop0 over /dev/dnbd0" in out
    layer = next(line for line in out.splitlines() if "writable layer:" in line)
    assert layer.startswith("  writable layer: /dev/vda1, thin-snapshot, "), layer
    size = float(layer.split("thin-snapshot, ")[1].split(" GiB")[0])
    assert 5.9 <= size <= 6.0  # the partition less the record and the pool metadata (printed rounded)
    grown = layer.split("; / ")[1]
    fs_after, fs_before = (float(x.split(" GiB")[0]) for x in grown.split(", grown from "))
    assert fs_before < 3 < 5.7 < fs_after, layer  # the image's root (3G disk) grown to the layer
    log = Path(out.split("serial log: ")[-1].strip()).read_text(errors="replace")
    assert "stage4-writable: /dev/mapper/root = thin-snapshot of /dev/xloop0p3 on /dev/vda1 (" in log
    facts = next(line for line in log.splitlines() if "STAGE4-WRITABLE " in line)
    assert "leaves=vda1,xloop0p3" in facts, facts
    fill = fill_report(log)
    assert fill["layer"] == "disk" and fill["result"] == "ok", fill
    assert f"fs_before={fill['fs_before']} " in facts, facts
    image_free = int(fill["fs_before"]) - int(fill["used_before"])
    assert 1.49 * image_free < int(fill["wrote"]) <= 1.5 * image_free, fill
    assert "writable: warning: " not in log  # the 6 GiB pool is far from 80 %


@pytest.mark.slow
@full_matrix
def test_a_persistent_layer_survives_the_next_boot(published: dict) -> None:
    """--persistent on one local disk file (in the full matrix only: three boots): the second boot of the
    same revision finds the first one's thin pool (stage 3 says kept, and would stop if thin volume 1 were
    missing) and the file system as the first boot grew it; a boot of another revision refuses that layer
    with its console line and starts a fresh one. Its own store (r1, r2 of the same prod image), so the
    revisions of `published` stay as the other tests expect them."""
    from stage4.boot import local_disk
    from stage4.runner import Runner

    work = published["work"]
    store, image = work / "persist-store", work / "output" / "debian-12" / "prod.qcow2"
    store.mkdir()
    for _ in range(2):
        stage4(
            published["project"], "export", image, "--store", store, "--name", NAME, "--server", "192.0.2.10"
        )
    (work / "persist-disk").mkdir()
    disk = local_disk.prepare("4G", local_disk.DEFAULT_IDENTIFIER, True, work / "persist-disk", Runner()).path

    def boot(rid: int, *options: str) -> subprocess.CompletedProcess:
        return stage4(
            published["project"],
            "netboot",
            store,
            NAME,
            "--rid",
            str(rid),
            "--local-disk",
            disk,
            "--persistent",
            *options,
            "--timeout",
            "1200",
        )

    result = boot(1, "--boots", "2")
    first, second = (line for line in result.stdout.splitlines() if "writable layer:" in line)
    assert first.startswith("  boot 1: writable layer: /dev/vda1, thin-snapshot, ") and ", fresh; / " in first
    assert ", grown from " in first
    assert (
        second.startswith("  boot 2: writable layer: /dev/vda1, thin-snapshot, ") and ", kept; / " in second
    )
    assert ", grown from " not in second  # already as large as the layer when the second boot began
    assert first.split("; / ")[1].split(",")[0] == second.split("; / ")[1]
    other = boot(2).stdout
    layer = next(line for line in other.splitlines() if "writable layer:" in line)
    assert ", fresh; / " in layer and ", grown from " in layer, layer
    log = Path(other.split("serial log: ")[-1].strip()).read_text(errors="replace")
    assert f"stage4-writable: /dev/vda1 held another layer (image={NAME} rid=1 table=" in log
    assert "): starting a fresh one" in log
