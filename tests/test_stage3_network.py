"""Stage 3 (dnbd3-rootfs) network functions on the host: the boot interface by BOOTIF, the static ip=
fallback, IPv6 literals in slxsrv, and the config download over several servers in random order for a
few rounds, against real HTTP servers on 127.0.0.1 (and ::1)."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "src/stage4/stage3/modules.d/90dnbd3-rootfs"


def bash(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    prefix = "".join(f"{key}={value}\n" for key, value in (env or {}).items())
    return subprocess.run(
        ["bash", "-c", f". {MODULE / 'stage4-lib.sh'}\n. {MODULE / 'stage4-net.sh'}\n{prefix}{script}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_bootif_names_the_mac_in_any_case_and_form() -> None:
    for bootif in ("01-52-54-00-AB-cd-EF", "01-52-54-00-ab-cd-ef", "52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef"):
        result = bash(f"slx_bootif_mac '{bootif}'")
        assert (result.returncode, result.stdout) == (0, "52:54:00:ab:cd:ef\n"), bootif
    for bad in ("02-52-54-00-ab-cd-ef", "01-52-54-00-ab", "52:54:00:ab:cd:eg", "", "01-52-54-00-ab-cd-ef-00"):
        assert bash(f"slx_bootif_mac '{bad}'").returncode == 1, bad


def test_bootif_picks_the_interface_with_that_address(tmp_path: Path) -> None:
    """A sysfs-like directory (as /sys/class/net shows it), then this machine's real interfaces."""
    for dev, address in (
        ("lo", "00:00:00:00:00:00"),
        ("eth0", "52:54:00:12:34:56"),
        ("ens4", "52:54:00:AB:CD:EF"),
    ):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "address").write_text(address + "\n")
    assert bash(f"slx_iface_by_mac 52:54:00:ab:cd:ef {tmp_path}").stdout == "ens4\n"
    assert bash(f"slx_iface_by_mac 52:54:00:12:34:56 {tmp_path}").stdout == "eth0\n"
    assert bash(f"slx_iface_by_mac 00:00:00:00:00:00 {tmp_path}").returncode == 1  # never lo
    assert bash(f"slx_iface_by_mac 52:54:00:00:00:01 {tmp_path}").returncode == 1
    real = [
        (dev.name, (dev / "address").read_text().strip())
        for dev in Path("/sys/class/net").iterdir()
        if dev.name != "lo" and (dev / "address").is_file()
    ]
    owners = {}
    for name, address in real:
        owners.setdefault(address, []).append(name)
    unique = [(name, address) for name, address in real if len(owners[address]) == 1]
    if not unique:
        pytest.skip("no network interface with an address of its own on this machine")
    name, address = unique[0]
    bootif = "01-" + address.upper().replace(":", "-")
    assert bash(f'slx_iface_by_mac "$(slx_bootif_mac {bootif})"').stdout == f"{name}\n"


def test_static_ip_argument() -> None:
    cases = {
        "10.0.2.15::10.0.2.2:255.255.255.0:client:eth0:none": "10.0.2.15/24 10.0.2.2 eth0",
        "192.168.1.9:192.168.1.1::255.255.0.0:::off": "192.168.1.9/16 - -",
        "10.1.2.3::10.1.0.1:22::ens3:": "10.1.2.3/22 10.1.0.1 ens3",
        "10.1.2.3": "10.1.2.3/24 - -",
    }
    for arg, expected in cases.items():
        result = bash(f"slx_parse_ip_arg '{arg}'")
        assert (result.returncode, result.stdout) == (0, expected + "\n"), arg
    refused = {
        "dhcp": "no IPv4 client address",
        "10.0.2.15::10.0.2.2:255.255.255.0:client:eth0:dhcp": "not a static address",
        "10.0.2.15::10.0.2.2:255.0.255.0::eth0:none": "bad netmask 255.0.255.0",
        "10.0.2.15::gateway:255.255.255.0::eth0:none": "the gateway is not an IPv4 address",
    }
    for arg, reason in refused.items():
        result = bash(f"slx_parse_ip_arg '{arg}'")
        assert result.returncode == 1, arg
        assert result.stderr == f"ip={arg}: {reason}\n"


def test_ipv6_literals_in_slxsrv() -> None:
    hosts = {
        "[2001:db8::1]:80": "2001:db8::1 80",
        "[2001:db8::1]": "2001:db8::1 80",
        "[::1]:8080": "::1 8080",
        "2001:db8::2": "2001:db8::2 80",
        "boot.example:81": "boot.example 81",
        "10.0.2.100": "10.0.2.100 80",
    }
    for hostport, expected in hosts.items():
        assert bash(f"slx_host_port '{hostport}' 80").stdout == expected + "\n", hostport
    urls = bash("slx_server_urls http '10.0.2.100,[2001:db8::1]:80 [2001:db8::1] 2001:db8::2' /boot/ config")
    assert urls.stdout.split() == [
        "http://10.0.2.100/boot/config",
        "http://[2001:db8::1]:80/boot/config",
        "http://[2001:db8::1]/boot/config",
        "http://[2001:db8::2]/boot/config",
    ]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _Server)
        with server.lock:
            server.requests.append(self.path)
            status = server.statuses.pop(0) if server.statuses else server.default
        self.send_response(status)
        self.end_headers()
        if status == 200:
            self.wfile.write(b"SLX_DNBD3_RID='7'\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    """Answers with `statuses` in order, then with `default`; records every request path."""

    def __init__(self, host: str, statuses: list[int], default: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _Handler)
        self.statuses, self.default = list(statuses), default
        self.requests: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server_address[1]}/boot/config"


@pytest.fixture
def http_servers() -> Iterator[list[_Server]]:
    made: list[_Server] = []
    yield made
    for server in made:
        server.shutdown()
        server.server_close()


def _closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/boot/config"


FAST = {"STAGE4_FETCH_WAIT": "0", "STAGE4_HTTP_TIMEOUT": "5"}


def test_download_tries_every_server_in_each_round_then_gives_up(
    tmp_path: Path, http_servers: list[_Server]
) -> None:
    broken = _Server("127.0.0.1", [], 503)
    http_servers.append(broken)
    down = _closed_url()
    out = tmp_path / "config"
    result = bash(f"slx_fetch_any {out} {broken.url} {down}", {**FAST, "STAGE4_FETCH_ROUNDS": "3"})
    assert result.returncode == 1
    tries = result.stderr.splitlines()
    assert len(tries) == 6, tries  # 3 rounds x 2 servers
    for round_tries in (tries[0:2], tries[2:4], tries[4:6]):
        assert sorted(t.split(": ")[0] for t in round_tries) == sorted([broken.url, down])
    assert f"{broken.url}: HTTP/1.0 503 Service Unavailable" in tries
    assert f"{down}: no connection to 127.0.0.1:{down.rsplit(':', 1)[1].split('/')[0]}" in tries
    assert len(broken.requests) == 3
    assert not out.exists() and not Path(f"{out}.part").exists()


def test_download_goes_on_until_a_server_answers(tmp_path: Path, http_servers: list[_Server]) -> None:
    """A server that fails twice and then answers: found in a later round, not given up after one."""
    late = _Server("127.0.0.1", [404, 500], 200)
    http_servers.append(late)
    out = tmp_path / "config"
    result = bash(f"slx_fetch_any {out} {_closed_url()} {late.url}", FAST)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "SLX_DNBD3_RID='7'\n"
    assert result.stderr.splitlines()[-1] == f"{late.url}: ok"
    assert len(late.requests) == 3 and late.requests[0] == "/boot/config"
    assert len(result.stderr.splitlines()) <= 6  # at most three rounds of two


def test_download_order_is_random() -> None:
    orders = {bash("slx_shuffle a b c").stdout for _ in range(30)}
    assert all(sorted(order.split()) == ["a", "b", "c"] for order in orders)
    assert len(orders) > 1, orders  # 30 times the same order: (1/6)^29
    assert bash("slx_shuffle").stdout == ""


def test_download_from_an_ipv6_literal(tmp_path: Path, http_servers: list[_Server]) -> None:
    try:
        server = _Server("::1", [], 200)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    http_servers.append(server)
    out = tmp_path / "config"
    result = bash(f"slx_fetch_any {out} {server.url}", FAST)
    assert result.returncode == 0, result.stderr
    assert server.url.startswith("http://[::1]:")
    assert out.read_text() == "SLX_DNBD3_RID='7'\n"


def _in_private_network(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`script` (with the module's functions) in a network namespace of its own, with /etc/resolv.conf a
    file of `tmp_path` (the lease script writes it): veth pair vA/vB with busybox udhcpd on vA
    (192.168.77.1), and dA/dB where nobody answers."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("busybox"):
        pytest.skip("needs root, unshare and busybox (a network namespace with a DHCP server)")
    (tmp_path / "udhcpd.conf").write_text(
        "start 192.168.77.10\nend 192.168.77.20\ninterface vA\n"
        f"lease_file {tmp_path}/leases\noption subnet 255.255.255.0\noption router 192.168.77.1\n"
        "option dns 192.168.77.1\n"
    )
    (tmp_path / "leases").touch()
    (tmp_path / "resolv.conf").touch()
    setup = f"""
        set -e
        mount --bind {tmp_path}/resolv.conf /etc/resolv.conf
        mount -t sysfs sysfs /sys  # this namespace's /sys/class/net
        ip link set lo up
        ip link add vA type veth peer name vB
        ip link add dA type veth peer name dB
        ip addr add 192.168.77.1/24 dev vA
        ip link set vA up
        ip link set dA up
        busybox udhcpd -f {tmp_path}/udhcpd.conf > /dev/null 2>&1 &
        trap 'kill $!' EXIT
        set +e
        . {MODULE / "stage4-lib.sh"}
        . {MODULE / "stage4-net.sh"}
        STAGE4_UDHCPC_SCRIPT={MODULE / "udhcpc-script.sh"}
        start=$SECONDS
    """
    return subprocess.run(
        ["unshare", "--net", "--mount", "bash", "-c", setup + script],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )


def test_dhcp_goes_on_to_the_interface_that_gets_a_lease(tmp_path: Path) -> None:
    result = _in_private_network(
        tmp_path,
        f'dev=$(slx_dhcp dB vB 2> {tmp_path}/dhcp.log); echo "rc=$? dev=$dev after=$((SECONDS - start))"\n'
        "ip -4 -o addr show dev vB; ip route show default",
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("rc=0 dev=vB after="), result.stdout + result.stderr
    assert int(lines[0].split("after=")[1]) >= 5  # a round of 3 x 2 s on dB first
    assert "inet 192.168.77." in lines[1] and lines[2].startswith("default via 192.168.77.1 dev vB")
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 192.168.77.1\n"


def test_dhcp_rounds_grow_until_the_time_is_up(tmp_path: Path) -> None:
    """Nobody answers: rounds of 3 tries, 2 s then 3 s apart (6 s, then 9 s), until 10 s have passed."""
    result = _in_private_network(
        tmp_path,
        f'STAGE4_DHCP_TIMEOUT=10 slx_dhcp dB 2> {tmp_path}/dhcp.log; echo "rc=$? after=$((SECONDS - start))"',
    )
    rc, after = result.stdout.split()
    assert rc == "rc=1", result.stdout + result.stderr
    assert 15 <= int(after.split("=")[1]) <= 60  # 6 + 1 + 9: the second round waited longer
    assert (tmp_path / "dhcp.log").read_text().count("broadcasting discover") == 6


def test_static_ip_is_set_on_its_interface(tmp_path: Path) -> None:
    """The ip= fallback for real: address, link and default route; no device in ip=: the default one."""
    result = _in_private_network(
        tmp_path,
        "slx_static_ip 192.168.78.5::192.168.78.1:255.255.255.0:client:dB:none vB; echo rc=$?\n"
        "slx_static_ip 192.168.79.5:::24 dA; echo rc=$?\n"
        "slx_static_ip 192.168.79.6:::24::eth9:none dA; echo rc=$?\n"
        "ip -4 -o addr show dev dB; ip -4 -o addr show dev dA; ip route show default",
    )
    out = result.stdout.splitlines()
    assert out[:7] == [
        "dB",
        "Address=192.168.78.5/24",
        "Gateway=192.168.78.1",
        "rc=0",
        "dA",
        "Address=192.168.79.5/24",
        "rc=0",
    ], result.stdout + result.stderr
    assert (
        out[7] == "rc=1" and result.stderr == "ip=192.168.79.6:::24::eth9:none: no network interface eth9\n"
    )
    assert "inet 192.168.78.5/24" in out[8] and "inet 192.168.79.5/24" in out[9]
    assert out[10].startswith("default via 192.168.78.1 dev dB")
