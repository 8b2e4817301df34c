"""What the user sees while stage4 works: a live step log, and with --debug every command and its output.

On a terminal the current step shows a spinner, its elapsed time and the last line its command printed;
elsewhere (CI, pipes) each step is one start line and one end line. Everything also goes to the build log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shlex
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.text import Text


class BuildLog:
    """A plain-text, timestamped log file of one build: every command, its output, every step."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8", errors="replace")
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        with self._lock:
            self._file.write(f"{stamp} {line.rstrip()}\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class Display:
    """The live step log on the console, mirrored into an optional BuildLog."""

    def __init__(self, console: Console | None = None, debug: bool = False, log: BuildLog | None = None):
        self.console = console or Console(stderr=True, highlight=False)
        self.debug = debug
        self.log = log
        self._live: Live | None = None
        self._step: str | None = None
        self._step_started = 0.0
        self._last_line = ""
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Show `name` as the running step; print how it ended and how long it took."""
        self._step, self._step_started, self._last_line = name, time.monotonic(), ""
        self._record(f"==> {name}")
        live = None
        if self.console.is_terminal and not self.debug:
            live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
            live.__enter__()
            self._live = live
        else:
            self.console.print(f"[bold]==>[/bold] {escape(name)}")
        ok, cause = False, ""
        try:
            yield
            ok = True
        except BaseException as exc:
            cause = ": " + (" ".join(str(exc).split()) or type(exc).__name__)
            raise
        finally:
            elapsed = time.monotonic() - self._step_started
            if live is not None:
                self._live = None
                live.__exit__(None, None, None)
            mark = "[green]ok[/green]" if ok else "[red]failed[/red]"
            self.console.print(f"{mark} {escape(name)} [dim]({elapsed:.1f} s)[/dim]")
            self._record(f"<== {name}: {'ok' if ok else 'failed'} after {elapsed:.1f} s{cause}")
            self._step = None

    def command(self, argv: Sequence[str]) -> None:
        text = shlex.join(str(a) for a in argv)
        self._record(f"$ {text}")
        if self.debug:
            self.console.print(f"[cyan]$ {escape(text)}[/cyan]")

    def output(self, line: str) -> None:
        """One line a command printed."""
        line = line.rstrip()
        self._record(f"  {line}")
        if self.debug:
            self.console.print(Text("  " + line, style="dim"))
        elif self._live is not None and line.strip():
            with self._lock:
                self._last_line = line.strip()
                self._live.update(self._render())

    def info(self, message: str) -> None:
        self._record(message)
        self.console.print(escape(message))

    def _record(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line)

    def _render(self) -> Spinner:
        elapsed = time.monotonic() - self._step_started
        tail = self._last_line[: max(20, self.console.width - len(self._step or "") - 20)]
        text = Text.assemble((self._step or "", "bold"), (f"  {elapsed:.0f} s  ", "dim"), (tail, "dim"))
        return Spinner("dots", text=text)
