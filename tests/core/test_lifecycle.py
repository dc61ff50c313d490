"""Lifecycle: real signals to a real child process, run() exit codes, drain, GC tuning."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper.core.errors import ConfigurationError
from esper.core.lifecycle import Lifecycle, run, tune_gc_for_hot_loop

SERVICE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from esper.core import Lifecycle, configure_logging, run

    WORK_S = float(sys.argv[1])

    async def main() -> int:
        configure_logging(level="INFO", fmt="json", service="drill")
        life = Lifecycle("drill", drain_timeout_s=float(sys.argv[2]))
        life.install_signal_handlers()

        async def worker() -> None:
            while not life.stopping:        # "reading" until asked to stop
                await asyncio.sleep(0.005)
            await asyncio.sleep(WORK_S)     # the in-flight message
            print("finished in-flight work", flush=True)

        task = asyncio.create_task(worker())
        loop_kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"ready loop={loop_kind}", flush=True)
        await life.wait_stopped()
        drained = await life.drain([task])
        print(f"stopped reason={life.stop_reason} drained={drained}", flush=True)
        return 0 if drained else 3

    sys.exit(run(main))
    """
)


def start_service(tmp_path: Path, work_s: float, drain_timeout_s: float) -> subprocess.Popen[str]:
    script = tmp_path / "service.py"
    script.write_text(SERVICE_SCRIPT, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(work_s), str(drain_timeout_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready loop=uvloop"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stops_and_drains(tmp_path: Path, sig: signal.Signals) -> None:
    proc = start_service(tmp_path, work_s=0.05, drain_timeout_s=10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "finished in-flight work" in out
    assert f"stopped reason={sig.name} drained=True" in out
    assert '"event": "stop requested"' in err
    assert '"service": "drill"' in err


def test_drain_timeout_cancels_and_reports(tmp_path: Path) -> None:
    proc = start_service(tmp_path, work_s=60, drain_timeout_s=0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "finished in-flight work" not in out
    assert "drained=False" in out
    assert "drain timed out" in err


def test_run_returns_exit_code_on_uvloop() -> None:
    seen: list[str] = []

    async def main() -> int:
        seen.append(type(asyncio.get_running_loop()).__module__)
        return 7

    async def main_none() -> None:
        await asyncio.sleep(0)

    assert run(main) == 7
    assert run(main_none) == 0
    assert seen[0].startswith("uvloop")


async def test_request_stop_before_event_exists() -> None:
    life = Lifecycle("x")
    assert not life.stopping
    life.request_stop("test")
    life.request_stop("again")  # ignored, first reason wins
    assert life.stopping
    assert life.stop_reason == "test"
    async with asyncio.timeout(1):
        await life.wait_stopped()


async def test_request_stop_wakes_waiter() -> None:
    life = Lifecycle("x")
    waiter = asyncio.create_task(life.wait_stopped())
    await asyncio.sleep(0)
    assert not waiter.done()
    life.request_stop("done")
    async with asyncio.timeout(1):
        await waiter
    assert life.stop_event.is_set()


async def test_install_and_remove_signal_handlers() -> None:
    life = Lifecycle("x")
    life.install_signal_handlers()
    try:
        signal.raise_signal(signal.SIGTERM)
        async with asyncio.timeout(1):
            await life.wait_stopped()
        assert life.stop_reason == "SIGTERM"
    finally:
        life.remove_signal_handlers()


async def test_drain_with_no_tasks() -> None:
    assert await Lifecycle("x").drain([])


def test_rejects_negative_drain_timeout() -> None:
    with pytest.raises(ConfigurationError):
        Lifecycle("x", drain_timeout_s=-1)


def test_tune_gc_for_hot_loop() -> None:
    old = gc.get_threshold()
    try:
        tune_gc_for_hot_loop(12_345)
        assert gc.get_threshold() == (12_345, old[1], old[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)
