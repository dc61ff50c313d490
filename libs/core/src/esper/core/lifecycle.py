"""Process plumbing shared by every Esper process: event loop, signals, drain, GC tuning.

A process's ``main`` looks like::

    async def main() -> int:
        life = Lifecycle("oona", drain_timeout_s=settings.drain_timeout_s)
        life.install_signal_handlers()
        ...start workers...
        await life.wait_stopped()          # SIGTERM: stop reading
        await life.drain(worker_tasks)     # finish in-flight, then cancel the rest
        return 0

    sys.exit(run(main))

Heartbeats and the ``/metrics`` + ``/healthz`` server are re-exported here for convenience.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from esper.core.errors import ConfigurationError
from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat, check_health
from esper.core.logging import get_logger

__all__ = ["HealthServer", "Heartbeat", "Lifecycle", "check_health", "run", "tune_gc_for_hot_loop"]

_log = get_logger(__name__)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # Windows, or a stripped install: the default loop still works, only slower
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Callable[[], Awaitable[int | None]]) -> int:
    """Run ``main()`` on uvloop (when installed) and return its exit code (``None`` → 0)."""

    async def _main() -> int | None:
        return await main()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(_main())
    return 0 if code is None else code


class Lifecycle:
    """Stop request plumbing: signals set one event; the process drains and exits on it."""

    def __init__(self, name: str, *, drain_timeout_s: float = 10.0) -> None:
        if drain_timeout_s < 0:
            raise ConfigurationError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        self.name = name
        self.drain_timeout_s = drain_timeout_s
        self._stop_event: asyncio.Event | None = None
        self._stop_reason: str | None = None
        self._signals: list[signal.Signals] = []

    @property
    def stop_event(self) -> asyncio.Event:
        """Set once a stop is requested; created on first use, inside the running loop."""
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
            if self._stop_reason is not None:
                self._stop_event.set()
        return self._stop_event

    @property
    def stopping(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to :meth:`request_stop` (call from inside the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
            self._signals.append(sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def request_stop(self, reason: str) -> None:
        """Ask the process to stop; later requests are logged and otherwise ignored.

        Call it from the loop's thread (signal handlers installed above are).
        """
        if self._stop_reason is not None:
            _log.info("stop already requested", service=self.name, reason=reason, first_reason=self._stop_reason)
            return
        self._stop_reason = reason
        _log.info("stop requested", service=self.name, reason=reason)
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_stopped(self) -> None:
        await self.stop_event.wait()

    async def drain(self, tasks: Iterable[asyncio.Task[Any]]) -> bool:
        """Give ``tasks`` up to ``drain_timeout_s`` to finish, then cancel the rest.

        Returns True when everything finished on its own. Exceptions of the tasks are not raised
        here; the caller that owns them decides.
        """
        pending_tasks = set(tasks)
        if not pending_tasks:
            return True
        _done, pending = await asyncio.wait(pending_tasks, timeout=self.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            _log.warning("drain timed out; cancelling", service=self.name, cancelled=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)
        return not pending


def tune_gc_for_hot_loop(gen0_threshold: int = 50_000) -> None:
    """Freeze start-up objects and raise the gen-0 threshold for a hot consumer loop.

    ARCHITECTURE §4: CPython's collector paused ~10 ms on 500-entry batches, because every batch
    allocates thousands of short-lived objects and each gen-0 pass also walks the long-lived
    start-up heap. ``gc.freeze()`` moves that heap out of the collector's sight and a higher
    threshold makes passes rarer. Call once, after start-up and before the loop.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
