"""Booting one exported revision in qemu exactly as a Stage4 client boots it, without leaving this machine.

The guest gets the revision's kernel and initramfs with the command line of its iPXE entry
(`ipxe.r<RID>`, ${slxsrv} and ${slxbase} filled in), fetches its stage-3 config over HTTP and the image
over DNBD3. Both are served on 127.0.0.1 and reached only through qemu user-network forwards
(`guestfwd ... cmd:`: a tiny bridge process per guest connection, into a counting relay in this
process), so no packet leaves qemu. The published config names the site's real servers; the guest gets
a copy whose SLX_DNBD3_SERVERS are the forwarded guest addresses, one per server, in order.

`find_active` is the client that boots from the active entry `<boot-dir>/ipxe` instead: the kernel and
initramfs that entry names, `<boot-dir>/config` as the config, and the revision that config names.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stage4.boot import local_disk, qemu
from stage4.boot.guest_network import BRIDGE, BootFiles, Relay
from stage4.config import MachineConfig
from stage4.dnbd3.protocol import DEFAULT_PORT, parse_address
from stage4.dnbd3.server import DevServer
from stage4.dnbd3.store import META_DIR, Store, validate_name
from stage4.errors import InputError, StepFailed
from stage4.export.records import ACTIVE_CONFIG, ACTIVE_IPXE, active_rid
from stage4.machine import accel
from stage4.runner import Runner

GUEST_NET = "10.0.2"
HTTP_GUEST = f"{GUEST_NET}.100"  # slirp's DHCP hands out .15 and up; .2 host, .3 DNS
FIRST_SERVER_GUEST = 101
# The boot NIC (user network, DHCP) and, before it, a second one that gets no DHCP answer (a socket backend
# on 127.0.0.1 that nothing connects to), as on a lab PC with two ports: stage 3 must take the one BOOTIF
# names.
BOOT_MAC = "52:54:00:5e:a4:01"
OTHER_MAC = "52:54:00:5e:a4:02"
SLXBASE = "boot"
# What the guest's stage 3 prints when it stops (the dnbd3-rootfs module): one line, "stage4: ...".
MODULE_FAILURE = re.compile(r"^stage4: \S")
ROOT_FACTS = re.compile(r"STAGE4-ROOT (?P<facts>.*)$")


@dataclass
class BootableRevision:
    """The published files of one revision."""

    store: Path
    name: str
    rid: int
    image: Path
    boot_dir: Path
    kernel: Path
    initrd: Path
    config: Path
    ipxe: Path

    @property
    def active(self) -> bool:
        """Booted through the active entry (`ipxe`, `config`), not through the revision's own files."""
        return self.ipxe.name == ACTIVE_IPXE


def find_revision(store: Path, name: str, rid: int | None, boot_dir: Path | None) -> BootableRevision:
    """The revision `rid` of `name` (default: the newest) and its boot files; bad input is one line."""
    validate_name(name)
    if not store.is_dir():
        raise InputError(f"store {store}: not a directory")
    revisions = Store(store).revisions(name)
    if not revisions:
        raise InputError(f"{name}: no revision in the store {store}")
    if rid is None:
        rid = revisions[-1].rid
    elif rid not in {r.rid for r in revisions}:
        raise InputError(
            f"{name}: no revision {rid} in the store {store} "
            f"(revisions: {', '.join(str(r.rid) for r in revisions)})"
        )
    boot_dir = boot_dir or store / META_DIR / name
    files = {kind: boot_dir / f"{kind}.r{rid}" for kind in ("kernel", "initrd", "config", "ipxe")}
    for kind, path in files.items():
        if not path.is_file():
            raise InputError(
                f"{path}: missing (the {kind} of {name}:{rid}; give --boot-dir if it was exported elsewhere)"
            )
    return BootableRevision(store, name, rid, store / f"{name}.r{rid}", boot_dir, **files)


def find(store: Path, name: str, rid: int | None, boot_dir: Path | None, *, active: bool) -> BootableRevision:
    """What to boot: revision `rid` (default: the newest), or with `active` as the active entry boots it."""
    if active and rid is not None:
        raise InputError(
            "--active boots the revision <boot-dir>/config names; it cannot be combined with --rid"
        )
    return find_active(store, name, boot_dir) if active else find_revision(store, name, rid, boot_dir)


def find_active(store: Path, name: str, boot_dir: Path | None) -> BootableRevision:
    """The active revision of `name` as the active entry `<boot-dir>/ipxe` boots it: its kernel and
    initramfs, `<boot-dir>/config` and the revision that config names; bad input is one line."""
    validate_name(name)
    if not store.is_dir():
        raise InputError(f"store {store}: not a directory")
    boot_dir = boot_dir or store / META_DIR / name
    config, ipxe = boot_dir / ACTIVE_CONFIG, boot_dir / ACTIVE_IPXE
    rid = active_rid(boot_dir, name)
    if rid is None:
        why = "no such file" if not config.is_file() else f"it names no revision of {name}"
        raise InputError(
            f"{name}: no active revision ({config}: {why}; `stage4 export --activate` makes one; "
            "give --boot-dir if it was exported elsewhere)"
        )
    if not ipxe.is_file():
        raise InputError(
            f"{ipxe}: missing (the active entry, written by `stage4 export --activate` with {config}; "
            "activate a revision again)"
        )
    entry = parse_ipxe(ipxe.read_text(encoding="utf-8", errors="replace"), str(ipxe))
    if "SLX_DNBD3_RID" in " ".join(entry.kernel_args):
        raise InputError(f"{ipxe}: pins SLX_DNBD3_RID on the kernel command line; it is not an active entry")
    files = {}
    prefix = "http://${slxsrv}/${slxbase}/"
    for kind, url in (("kernel", entry.kernel_url), ("initrd", entry.initrd_url)):
        leaf = url.removeprefix(prefix)
        if not url.startswith(prefix) or "/" in leaf:
            raise InputError(f"{ipxe}: the {kind} {url} is not in the boot directory (${{slxbase}})")
        if leaf != f"{kind}.r{rid}":
            raise InputError(
                f"{ipxe}: boots {leaf}, but {config} names revision {rid} (an inconsistent activation; "
                "activate a revision again)"
            )
        files[kind] = boot_dir / leaf
        if not files[kind].is_file():
            raise InputError(f"{files[kind]}: missing (the {kind} the active entry {ipxe} boots)")
    if rid not in {r.rid for r in Store(store).revisions(name)}:
        raise InputError(f"{name}: the active revision {rid} ({config}) is not in the store {store}")
    return BootableRevision(
        store, name, rid, store / f"{name}.r{rid}", boot_dir, config=config, ipxe=ipxe, **files
    )


@dataclass
class IpxeEntry:
    kernel_args: list[str]
    kernel_url: str
    initrd_url: str


def parse_ipxe(text: str, source: str = "ipxe entry") -> IpxeEntry:
    """The kernel line (URL and arguments) and the initrd URL of an iPXE script."""
    kernel = initrd = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "kernel" and len(words) > 1:
            kernel = words[1:]
        elif words[0] == "initrd" and len(words) > 1:
            initrd = words[1]
    if not kernel or initrd is None:
        raise InputError(f"{source}: needs a 'kernel URL ARGS...' and an 'initrd URL' line")
    return IpxeEntry(kernel[1:], kernel[0], initrd)


def substitute(text: str, variables: dict[str, str]) -> str:
    """iPXE's ${name} settings, as iPXE expands them; an unknown one is an error, not an empty string."""

    def value(match: re.Match[str]) -> str:
        if match[1] not in variables:
            raise InputError(f"iPXE entry uses ${{{match[1]}}}, which a client's menu does not set")
        return variables[match[1]]

    return re.sub(r"\$\{([A-Za-z0-9_.:-]+)\}", value, text)


def kernel_command_line(entry: IpxeEntry, slxsrv: str, slxbase: str, mac: str = BOOT_MAC) -> str:
    """The kernel arguments of the entry as the client gets them, plus the serial console."""
    settings = {"slxsrv": slxsrv, "slxbase": slxbase, "mac": mac, "mac:hexhyp": mac.replace(":", "-")}
    args = [substitute(arg, settings) for arg in entry.kernel_args]
    return " ".join([*args, "console=ttyS0,115200n8"])


def guest_config(published: str, servers: list[str], keys: dict[str, str] | None = None) -> str:
    """The published stage-3 config with SLX_DNBD3_SERVERS (first if missing) and `keys` (last if missing)
    replaced: every other line stays as it is."""
    out = published.splitlines()
    for key, value in {"SLX_DNBD3_SERVERS": " ".join(servers), **(keys or {})}.items():
        line = f"{key}={shlex.quote(value)}"
        kept, replaced = [], False
        for text in out:
            if re.match(rf"^\s*(export\s+)?{key}=", text):
                if not replaced:
                    kept.append(line)
                replaced = True
            else:
                kept.append(text)
        if not replaced:
            kept.insert(0 if key == "SLX_DNBD3_SERVERS" else len(kept), line)
        out = kept
    return "\n".join(out) + "\n"


def config_tarball(published: str, boot_dir: Path) -> Path | None:
    """The config.tgz the config names (SLX_CONFIG_NAME, a file of the boot directory), if it is there."""
    match = re.search(
        r"^\s*(?:export\s+)?SLX_CONFIG_NAME=(['\"]?)([A-Za-z0-9._-]+)\1\s*$", published, re.MULTILINE
    )
    path = boot_dir / match[2] if match else None
    return path if path and path.is_file() else None


def guest_servers(count: int) -> list[str]:
    """The guest addresses of the forwarded DNBD3 servers (default port, so written without it)."""
    return [f"{GUEST_NET}.{FIRST_SERVER_GUEST + i}" for i in range(count)]


def loopback_server(text: str) -> tuple[str, int]:
    """A --server: HOST:PORT on this machine; anything else would send client traffic elsewhere."""
    host, port = parse_address(text)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InputError(f"--server {text}: netboot uses DNBD3 servers on this machine only (127.0.0.1:PORT)")
    return ("127.0.0.1" if host == "localhost" else host), port


@dataclass
class Forwards:
    """The qemu user network of one netboot: guest address:port -> relay on 127.0.0.1."""

    http: Relay
    dnbd3: list[Relay]
    bridge: Path

    def nic(self) -> str:
        def forward(address: str, port: int, relay: Relay) -> str:
            command = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(str(self.bridge))} {relay.port}"
            if "," in command:
                command = command.replace(",", ",,")  # qemu's option syntax
            return f"guestfwd=tcp:{address}:{port}-cmd:{command}"

        parts = [f"user,model=virtio-net-pci,mac={BOOT_MAC},restrict=on", forward(HTTP_GUEST, 80, self.http)]
        parts += [
            forward(address, DEFAULT_PORT, relay)
            for address, relay in zip(guest_servers(len(self.dnbd3)), self.dnbd3, strict=True)
        ]
        return ",".join(parts)

    @property
    def dnbd3_bytes(self) -> int:
        return sum(relay.bytes_to_guest for relay in self.dnbd3)


@contextlib.contextmanager
def forwards(
    revision: BootableRevision, servers: list[tuple[str, int]], work: Path, keys: dict[str, str] | None = None
) -> Iterator[Forwards]:
    """HTTP boot files and relays to `servers` until the context ends; `keys`: more config for the guest."""
    published = revision.config.read_text(encoding="utf-8", errors="replace")
    guest = guest_config(published, guest_servers(len(servers)), keys)
    files: dict[str, bytes | Path] = {
        f"/{SLXBASE}/config": guest.encode(),
        f"/{SLXBASE}/{revision.kernel.name}": revision.kernel,
        f"/{SLXBASE}/{revision.initrd.name}": revision.initrd,
    }
    tarball = config_tarball(published, revision.boot_dir)
    if tarball:
        files[f"/{SLXBASE}/{tarball.name}"] = tarball
    bridge = work / "bridge.py"
    bridge.write_text(BRIDGE, encoding="utf-8")
    with contextlib.ExitStack() as stack:
        http_files = BootFiles(files).start()
        stack.callback(http_files.close)
        relays = []
        for target in [("127.0.0.1", http_files.port), *servers]:
            relay = Relay(target).start()
            stack.callback(relay.close)
            relays.append(relay)
        yield Forwards(relays[0], relays[1:], bridge)


def root_facts(serial_log: Path) -> dict[str, str]:
    """The STAGE4-ROOT line of the image's marker script: what / is made of, read in the guest."""
    return root_facts_of(serial_log.read_text(encoding="utf-8", errors="replace"))


def root_facts_of(text: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in text.splitlines():
        match = ROOT_FACTS.search(line)
        if match:
            facts = dict(word.split("=", 1) for word in match["facts"].split() if "=" in word)
    return facts


def check_root(facts: dict[str, str], name: str, rid: int) -> str:
    """One sentence describing the client's root, or StepFailed saying what is not as a client has it."""
    source = facts.get("source", "?")
    slaves = [s for s in facts.get("slaves", "").split(",") if s]
    origin = next((s for s in slaves if re.match(r"^xloop\d+p\d+$", s)), None)
    # the RAM disk, or the thin pool (a dm device) of a layer on a local disk
    ram = next((s for s in slaves if re.match(r"^(zram|ram|dm-)\d+$", s)), None)
    loop = re.sub(r"p\d+$", "", origin) if origin else ""  # only looked at when there is an origin
    problems = []
    if not facts:
        problems.append("the image printed no STAGE4-ROOT line (its marker script is older than netboot)")
    elif "dm" not in facts:
        problems.append(f"/ is {source}, not a device-mapper device")
    elif not (origin and ram):
        problems.append(
            f"/ ({source}, dm {facts['dm']}) is not over an xloop partition and a RAM disk or thin pool "
            f"(slaves: {','.join(slaves) or 'none'})"
        )
    elif facts.get(loop) != "/dev/dnbd0":
        problems.append(f"{loop} is backed by {facts.get(loop, 'nothing')}, not /dev/dnbd0")
    elif not facts.get("dnbd0", "").startswith(f"{name}:{rid}@"):
        problems.append(f"/dev/dnbd0 serves {facts.get('dnbd0', 'nothing')}, not {name}:{rid}")
    if problems:
        raise StepFailed("netboot check", problems[0])
    return f"/ = {source} (dm {facts['dm']}: {origin} + {ram}), {loop} over /dev/dnbd0 = {facts['dnbd0']}"


@dataclass
class NetbootResult:
    name: str
    rid: int
    seconds: float  # qemu start to the userspace marker
    dnbd3_bytes: int  # what the client read over DNBD3 until the marker
    image_size: int
    accelerator: str
    serial_log: Path
    root: str  # what / is, as the guest reported it
    servers: list[str]  # the loopback servers, in the guest's order
    display_manager: str | None = None  # a desktop image's active display manager
    layers: list[str] = field(default_factory=list)  # the writable layer of each boot


def netboot(
    revision: BootableRevision,
    servers: list[tuple[str, int]],
    machine: MachineConfig,
    cache_dir: Path,
    timeout: float,
    serial_log: Path,
    work: Path,
    runner: Runner,
    screenshot: Path | None = None,
    disk_request: local_disk.DiskRequest | None = None,
    boots: int = 1,
    kernel_args: tuple[str, ...] = (),
) -> NetbootResult:
    """Boot `revision` from `servers` (none: a development server for its store) `boots` times, with
    the requested local disk, and check the result."""
    display = runner.display
    disk = None
    if disk_request is not None:
        config_text = revision.config.read_text(encoding="utf-8", errors="replace")
        identifier = local_disk.configured_identifier(config_text)
        with display.step(f"local disk {disk_request.spec} with a GPT partition named {identifier}"):
            disk = local_disk.prepare(disk_request.spec, identifier, disk_request.persistent, work, runner)
    with contextlib.ExitStack() as stack:
        if not servers:
            with display.step(f"start a development DNBD3 server for {revision.store}"):
                server = DevServer(revision.store).start()
                stack.callback(server.close)
                servers = [server.address]
        described = [f"{host}:{port}" for host, port in servers]
        entry = parse_ipxe(revision.ipxe.read_text(encoding="utf-8", errors="replace"), str(revision.ipxe))
        with display.step(f"serve {revision.boot_dir} over HTTP and relay DNBD3 to {' '.join(described)}"):
            keys = local_disk.guest_keys(disk) if disk else None
            fwd = stack.enter_context(forwards(revision, servers, work, keys))
        accelerator = accel.choose(machine.accelerator.value, revision.kernel, runner, cache_dir)
        at_marker: list[int] = []
        layers: list[str] = []
        for boot in range(1, boots + 1):
            log = serial_log if boot == 1 else serial_log.with_name(f"boot{boot}-{serial_log.name}")
            spec = qemu.BootSpec(
                None,
                accelerator,
                machine.cpus,
                machine.memory >> 20,
                log,
                kernel=revision.kernel,
                initrd=revision.initrd,
                append=qemu.with_kernel_args(kernel_command_line(entry, HTTP_GUEST, SLXBASE), kernel_args),
                timeout=timeout,
                nic=fwd.nic(),
                fail_on=MODULE_FAILURE,
                on_marker=lambda: at_marker.append(fwd.dnbd3_bytes),
                other_nics=(f"socket,listen=127.0.0.1:{_free_port()},model=virtio-net-pci,mac={OTHER_MAC}",),
                screenshot=screenshot,
                disk=disk.path if disk else None,
            )
            display.info(f"serial log: {log}")
            what = f"{revision.name}:{revision.rid}" + (f" (boot {boot} of {boots})" if boots > 1 else "")
            what += f" through the active entry {revision.ipxe}" if revision.active else ""
            with display.step(f"netboot {what} on {accelerator}, waiting for userspace"):
                try:
                    booted = qemu.boot(spec, runner)
                except StepFailed:
                    line = _module_line(log)
                    if line:
                        raise StepFailed("netboot", line, log) from None
                    raise
            with display.step("check that / is the copy-on-write device over xloop over /dev/dnbd0"):
                root = check_root(root_facts(log), revision.name, revision.rid)
                layer = local_disk.check_writable(local_disk.writable_facts(log), disk, boot)
                layers.append(f"boot {boot}: {layer}" if boots > 1 else layer)
            if boot == 1:
                seconds = booted.seconds
    return NetbootResult(
        revision.name,
        revision.rid,
        seconds,
        at_marker[0] if at_marker else fwd.dnbd3_bytes,
        revision.image.stat().st_size,
        accelerator,
        serial_log,
        root,
        described,
        booted.display_manager,
        layers,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _module_line(serial_log: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in serial_log.read_text(encoding="utf-8", errors="replace").splitlines():
            if MODULE_FAILURE.search(line.strip()):
                return line.strip()
    return None
