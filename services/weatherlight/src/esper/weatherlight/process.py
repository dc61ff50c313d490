"""One supervised child process: start it in its own session, probe it, stop it and its group.

`subprocess.Popen` (not asyncio's subprocess API) because the children must die with the
supervisor: Linux's `PR_SET_PDEATHSIG` is set in the child before exec, and Popen from the loop's
own thread is the one place that is reliable (the signal fires when the *forking thread* exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from esper.core.probe import http_get
from esper.weatherlight.fleet import ServiceSpec

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A service process with a log file, a metrics port, and a start count."""

    def __init__(self, spec: ServiceSpec, *, env: dict[str, str], log_dir: Path, port: int, cwd: Path) -> None:
        self.spec = spec
        self.env = env
        self.port = port
        self.cwd = cwd
        self.log_path = log_dir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.last_exit: int | None = None
        self._log: IO[bytes] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"--- weatherlight: start {self.starts + 1} of {self.name}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, *self.spec.argv], env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        """The exit code once the process ended (then it is reaped), else None."""
        if self.proc is None:
            return self.last_exit
        code = self.proc.poll()
        if code is not None:
            self.last_exit = code
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, timeout_s: float) -> bool:
        """SIGTERM, wait, then SIGKILL the whole group. True when it exited on SIGTERM within the grace."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self._close_log()
            return True
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, timeout_s)
        graceful = proc.poll() is not None
        self.signal_group(signal.SIGKILL)  # the group too: nothing the child forked outlives it
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        self.last_exit = proc.returncode
        self._close_log()
        return graceful

    async def healthz(self, timeout_s: float = 2.0) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, JSON body) of the child's /healthz; None when it does not answer yet."""
        answer = await http_get(self.port, "/healthz", timeout_s=timeout_s)
        if answer is None:
            return None
        try:
            data = json.loads(answer[1]) if answer[1] else {}
        except ValueError:
            return None
        return answer[0], data if isinstance(data, dict) else {}

    async def ready(self) -> bool:
        answer = await self.healthz()
        if answer is None or answer[0] != 200:
            return False
        key = self.spec.ready_key
        return key is None or answer[1].get(key) is not None

    def tail(self, limit: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
