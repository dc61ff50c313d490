"""The supervisor with real processes: a crashed service comes back, shutdown leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from esper.weatherlight.fleet import resolve
from esper.weatherlight.settings import WeatherlightSettings
from esper.weatherlight.supervisor import StartupError, Supervisor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _settings(tmp_path: Path, **kw: object) -> WeatherlightSettings:
    base: dict[str, object] = {"var_dir": tmp_path, "metrics_port": -1, "restart_min_s": 0.05, "restart_max_s": 0.2,
                               "poll_s": 0.05, "ready_timeout_s": 60.0, "stop_timeout_s": 10.0}
    return WeatherlightSettings(**{**base, **kw})  # type: ignore[arg-type]


async def _until_ready(sup: Supervisor, name: str) -> bool:
    for _ in range(600):
        child = sup.children[name]
        if child.alive() and await child.ready():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_crashed_service_is_restarted_and_shutdown_is_clean(tmp_path: Path, redis_url: str,
                                                                   secret: str) -> None:
    sup = Supervisor(_settings(tmp_path, redis_url=redis_url, leyline_secret=secret), resolve(["oona"]))
    stop = asyncio.Event()
    await sup.start()
    watch = asyncio.create_task(sup.watch(stop))
    try:
        first = sup.children["oona"].pid
        assert first is not None and _alive(first)
        os.kill(first, signal.SIGKILL)
        for _ in range(400):
            if sup.children["oona"].starts == 2:
                break
            await asyncio.sleep(0.05)
        assert await _until_ready(sup, "oona")
        second = sup.children["oona"].pid
        assert second is not None and second != first
        assert sup.outcome.restarts == {"oona": 1}
        assert sup.metrics.restarts.labels("oona")._value.get() == 1
    finally:
        stop.set()
        await watch
        outcome = await sup.shutdown()
    assert outcome.graceful == {"oona": True} and outcome.clean_shutdown
    assert not _alive(second)


async def test_embedded_redis_is_started_and_stopped(tmp_path: Path) -> None:
    sup = Supervisor(_settings(tmp_path), resolve(["oona"]))
    await sup.start()
    try:
        assert sup.redis is not None and sup.redis.running
        assert sup.secret  # generated for the embedded fleet
        pids = [sup.redis.pid, sup.children["oona"].pid]
    finally:
        outcome = await sup.shutdown()
    assert outcome.clean_shutdown and outcome.redis_stopped
    assert not any(_alive(p) for p in pids if p is not None)


async def test_service_that_cannot_start_fails_startup_with_its_log(tmp_path: Path, redis_url: str,
                                                                    secret: str) -> None:
    # A too-short secret is a configuration error in the child (exit 2), surfaced by name with its log.
    sup = Supervisor(_settings(tmp_path, redis_url=redis_url, leyline_secret=secret), resolve(["oona"]),
                     per_service_env={"oona": {"ESPER_LEYLINE_SECRET": "short"}})
    with pytest.raises(StartupError, match="oona exited with code 2"):
        await sup.start()
    await sup.shutdown()
