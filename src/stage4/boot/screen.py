"""Screenshots of a booted guest: qemu's QMP `screendump` of the VGA screen, written as PNG by qemu.

A display manager reports itself active before its greeter has drawn anything: the screen is dumped
again and again until it shows a picture, or the wait ends. A picture has many distinct colours (a text
console has 16 at most) and more than a mouse pointer off its background colour: an X screen with only
its pointer has some 80 colours on 0.03 % of it; GDM's greeter, flat and dark, differs from its
background on 1.2 % (337 colours), LightDM's on 11 %.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from PIL import Image

from stage4.errors import StepFailed

# The VGA screen's preferred mode, announced to the guest through EDID: what a screenshot measures.
SCREEN_SIZE = (1024, 768)
MIN_COLOURS = 64
MAX_BACKGROUND = 0.995  # the share of the most common colour
# GNOME Shell on Mesa's software renderer under TCG: about 4 minutes from GDM active to its greeter.
SCREEN_WAIT = 600
POLL_SECONDS = 3


class Qmp:
    """A minimal QMP client on qemu's unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.stream = self.sock.makefile("rw", encoding="utf-8")
        self._reply()  # the greeting
        self.command("qmp_capabilities")

    def _reply(self) -> dict[str, Any]:
        while True:
            line = self.stream.readline()
            if not line:
                raise ConnectionError("qemu closed the QMP socket")
            message: dict[str, Any] = json.loads(line)  # a QMP message: a JSON object
            if "event" not in message:
                return message

    def command(self, name: str, **arguments: object) -> dict[str, Any]:
        self.stream.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        self.stream.flush()
        reply = self._reply()
        if "error" in reply:
            raise StepFailed("screenshot", f"qemu refused {name}: {reply['error'].get('desc', reply)}")
        result: dict[str, Any] = reply.get("return", {})
        return result

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def colours(png: Path) -> tuple[int, float]:
    """The number of distinct colours in a picture and the share of its most common colour."""
    with Image.open(png) as picture:
        found = picture.convert("RGB").getcolors(maxcolors=1 << 24) or []
        pixels = picture.width * picture.height
    return len(found), max((count for count, _ in found), default=pixels) / pixels


def drawn(found: tuple[int, float]) -> bool:
    return found[0] >= MIN_COLOURS and found[1] <= MAX_BACKGROUND


def capture(qmp_socket: Path, target: Path, wait: float = SCREEN_WAIT) -> int:
    """Dump the guest's screen into `target` (PNG) once it shows a picture; returns its colour count.

    The dump goes to a hidden file beside `target` and is moved into place only when it qualifies, so
    `target` is never a blank or half-written picture.
    """
    partial = target.with_name(f".{target.name}.partial")
    deadline = time.monotonic() + wait
    qmp = Qmp(qmp_socket)
    try:
        while True:
            qmp.command("screendump", filename=str(partial.absolute()), format="png")
            found = colours(partial)
            if drawn(found):
                os.replace(partial, target)
                return found[0]
            if time.monotonic() > deadline:
                raise StepFailed(
                    "screenshot",
                    f"the screen still shows no picture after {wait:.0f} s ({found[0]} colours, one of them "
                    f"on {found[1]:.0%} of it): the display manager is active but its greeter drew nothing",
                )
            time.sleep(POLL_SECONDS)
    finally:
        qmp.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def quit_guest(qmp_socket: Path) -> None:
    """End qemu through QMP (a screenshot boot does not ask the guest to power off)."""
    with contextlib.suppress(OSError, ConnectionError, StepFailed):
        qmp = Qmp(qmp_socket, timeout=10)
        try:
            qmp.command("quit")
        finally:
            qmp.close()
