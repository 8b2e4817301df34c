"""The one way stage4 runs external commands.

Every command is logged, its output is streamed line by line to the build log and the progress display,
a failure becomes a StepFailed naming the step, and an interruption (SIGINT, SIGTERM) terminates the
command's whole process group before it propagates. Children run in their own session so that a Ctrl-C
reaches stage4 first and stage4 decides how they end.

Children also die with stage4 when stage4 itself is killed (SIGKILL, the OOM killer), so that nothing keeps
writing into a layer nobody owns: each gets PR_SET_PDEATHSIG, and a guardian process (stage4/guardian.py)
ends their whole process groups once stage4's end closes its pipe. Inside `Runner.recording(dir)` every
command started is recorded in `dir` with its PID (stage4/attachments.py), for the next build to find.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from stage4 import attachments
from stage4.errors import Interrupted, StepFailed
from stage4.ui import Display

TERMINATE_GRACE_SECONDS = 20
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_guardian: subprocess.Popen[bytes] | None = None


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: str


@dataclass
class Process:
    """A command running in the background (qemu, a storage daemon), stopped on exit of its context."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    _listeners: list[Callable[[str], None]] = field(default_factory=list)

    def running(self) -> bool:
        return self.popen.poll() is None

    def on_line(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)


def install_signal_handlers() -> None:
    """Turn SIGTERM (and SIGINT) into Interrupted so that every cleanup in the call stack runs."""

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
    """A child's stream that was opened with PIPE (so it is never None)."""
    assert stream is not None
    return stream


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when stage4 dies (the Popen runs in stage4's main thread)."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # stage4 died before prctl took effect
            os._exit(1)

    return preexec


def _guard(line: str) -> None:
    """Tell the guardian about a process group (started once per stage4 process, lazily)."""
    global _guardian
    if _guardian is None or _guardian.poll() is not None:
        _guardian = subprocess.Popen(
            [sys.executable, "-m", "stage4.guardian"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    stdin = _pipe(_guardian.stdin)
    with contextlib.suppress(BrokenPipeError):
        stdin.write(f"{line}\n".encode())
        stdin.flush()


def _stop_group(
    popen: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = TERMINATE_GRACE_SECONDS
) -> None:
    """Stop a child and everything it started; escalate to SIGKILL after `grace` seconds."""
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)
    deadline = time.monotonic() + grace
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


class Runner:
    def __init__(self, display: Display | None = None):
        self.display = display or Display()
        self._recording: list[Path] = []

    @contextlib.contextmanager
    def recording(self, directory: Path) -> Iterator[None]:
        """Record every command started while the context lasts (and what `note` is told) in `directory`."""
        with attachments.scope(directory):
            self._recording.append(directory)
            try:
                yield
            finally:
                self._recording.pop()

    def note(self, what: str, **facts: object) -> None:
        """Record an attachment (a loop device, a mount point) in the directory being recorded in, if any."""
        if self._recording:
            attachments.note(self._recording[-1], what, **facts)

    def _popen(
        self,
        args: list[str],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        # preexec_fn only calls prctl (no allocation, no locks), so the reader threads cannot deadlock it.
        popen = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        _guard(f"+{popen.pid}")
        if self._recording:
            attachments.note_process(self._recording[-1], popen.pid, args)
        return popen

    def _reaped(self, popen: subprocess.Popen[bytes]) -> None:
        if popen.returncode is not None:
            _guard(f"-{popen.pid}")

    @property
    def log_path(self) -> Path | None:
        return self.display.log.path if self.display.log else None

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        step: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: bytes | None = None,
        capture: bool = False,
        check: bool = True,
        timeout: float | None = None,
    ) -> Completed:
        """Run a command to its end. With capture, its stdout is returned instead of being streamed."""
        args = [str(a) for a in argv]
        self.display.command(args)
        full_env = None if env is None else {**os.environ, **env}
        try:
            popen = self._popen(
                args,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=cwd,
            )
        except FileNotFoundError as exc:
            raise StepFailed(step, f"command not found: {args[0]} (run ./install.sh)") from exc
        stdout_pipe, stderr_pipe = _pipe(popen.stdout), _pipe(popen.stderr)
        tail: deque[str] = deque(maxlen=15)
        captured: list[bytes] = []

        def pump_stderr() -> None:
            for raw in stderr_pipe:
                line = raw.decode(errors="replace")
                tail.append(line.rstrip())
                self.display.output(line)

        readers = [threading.Thread(target=pump_stderr, daemon=True)]
        if capture:
            readers.append(threading.Thread(target=lambda: captured.append(stdout_pipe.read()), daemon=True))
        else:

            def pump_stdout() -> None:
                for raw in stdout_pipe:
                    line = raw.decode(errors="replace")
                    tail.append(line.rstrip())
                    self.display.output(line)

            readers.append(threading.Thread(target=pump_stdout, daemon=True))
        for reader in readers:
            reader.start()
        try:
            if input is not None:
                with contextlib.suppress(BrokenPipeError):
                    stdin_pipe = _pipe(popen.stdin)
                    stdin_pipe.write(input)
                    stdin_pipe.close()
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(popen)
            raise StepFailed(
                step, f"{args[0]} did not finish within {timeout:.0f} s", self.log_path
            ) from None
        except BaseException:
            _stop_group(popen)
            raise
        finally:
            self._reaped(popen)
        for reader in readers:
            reader.join()
        stdout = b"".join(captured).decode(errors="replace")
        if capture:
            for line in stdout.splitlines()[:200]:
                self.display.output(line)
        if check and popen.returncode != 0:
            last = " | ".join(line for line in tail if line.strip())[-600:]
            detail = f"{Path(args[0]).name} exited with {popen.returncode}" + (f": {last}" if last else "")
            raise StepFailed(step, detail, self.log_path)
        return Completed(args, popen.returncode, stdout)

    @contextlib.contextmanager
    def background(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        step: str,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        grace: float = 10,
        on_line: Callable[[str], None] | None = None,
    ) -> Iterator[Process]:
        """Start a long-running command; its output lines are streamed, kept and passed to `on_line`.

        The command is stopped (its whole process group) when the context exits.
        """
        args = [str(a) for a in argv]
        self.display.command(args)
        full_env = None if env is None else {**os.environ, **env}
        try:
            popen = self._popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env
            )
        except FileNotFoundError as exc:
            raise StepFailed(step, f"command not found: {args[0]} (run ./install.sh)") from exc
        process = Process(args, popen)
        if on_line is not None:
            process.on_line(on_line)

        stdout_pipe = _pipe(popen.stdout)

        def pump() -> None:
            for raw in stdout_pipe:
                line = raw.decode(errors="replace").rstrip("\r\n")
                process.lines.append(line)
                self.display.output(line)
                for listener in list(process._listeners):
                    listener(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield process
        finally:
            _stop_group(popen, stop_signal, grace)
            self._reaped(popen)
            reader.join(timeout=5)
