"""The plumbing of a netboot's qemu user network: a loopback HTTP server for the boot files, relays that
pass each guest connection to a server on 127.0.0.1 and count the bytes sent back, and the bridge script
qemu's guestfwd runs per connection."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

# Per guest connection qemu runs this with the guest's TCP stream on stdin/stdout and passes it to
# 127.0.0.1:PORT. It must never print: its stderr goes into the guest's stream as well. Its stdin/stdout
# is qemu's end of a TCP connection on loopback (libslirp's socket pair). Without TCP_NODELAY on it, Nagle
# held back the tail of a reply that came in two parts until qemu's delayed ACK (40 ms); without
# TCP_QUICKACK (which the kernel clears, so it is set again after every read), qemu's second request in a
# row waited for the bridge's delayed ACK. Together: about one DNBD3 request in six of a netboot.
BRIDGE = """\
import select, socket, sys
guest = socket.socket(fileno=0)
server = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for sock in (guest, server):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    ready, _, _ = select.select([guest, server], [], [])
    if guest in ready:
        data = guest.recv(1 << 16)
        if not data:
            break
        guest.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        server.sendall(data)
    if server in ready:
        data = server.recv(1 << 16)
        if not data:
            break
        guest.sendall(data)
"""


@dataclass
class Relay:
    """A loopback listener that passes each connection to `target` and counts the bytes sent back."""

    target: tuple[str, int]
    bytes_to_guest: int = 0
    connections: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name=f"relay-{self.target[1]}", daemon=True)

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    def start(self) -> Relay:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._sockets.add(client)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._close(client)  # a server that is down: the guest sees the connection end
            return
        upstream.settimeout(None)
        # Without this, Nagle holds back the last part of each reply until the bridge's delayed ACK
        # (40 ms), once per DNBD3 request: most of a netboot's time.
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.add(upstream)
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if count:  # before sending: once the guest has the bytes, they are counted
                    with self._lock:
                        self.bytes_to_guest += len(data)
                sink.sendall(data)
        except OSError:
            pass
        self._close(source)
        self._close(sink)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)


class BootFiles:
    """An HTTP server on 127.0.0.1 for /<slxbase>/...: the guest's config, the revision's boot files."""

    def __init__(self, files: dict[str, bytes | Path]):
        self.files = files
        served = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                item = served.get(self.path.split("?", 1)[0])
                if item is None:
                    self.send_error(404)
                    return
                body = item if isinstance(item, bytes) else item.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="netboot-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> BootFiles:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
