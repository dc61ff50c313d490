"""`esper up`: run the fleet under the supervisor; with `epochs`, train once, stop and summarise.

Exit codes scripts can trust: 0 the run finished and everything shut down cleanly, 1 a service
failed to start or the trainer failed, 2 configuration error, 3 the trainer halted on an emergency,
4 the run finished but the shutdown was not clean, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from esper.core.files import write_bytes_atomic
from esper.core.health_server import HealthServer
from esper.core.lifecycle import Lifecycle
from esper.core.logging import configure_logging
from esper.leyline import DEADLETTER_STREAM
from esper.weatherlight.fleet import resolve
from esper.weatherlight.settings import WeatherlightSettings
from esper.weatherlight.summary import fleet_summary, print_summary
from esper.weatherlight.supervisor import FleetOutcome, StartupError, Supervisor

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_HALTED, EXIT_UNCLEAN, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


@dataclass(slots=True)
class _Run:
    started: bool = False
    interrupted: bool = False
    summary_path: Path | None = None
    dead_letters: int = 0


def _dead_letters(url: str) -> int:
    with redis.Redis.from_url(url, socket_timeout=2) as r:
        return int(r.xlen(DEADLETTER_STREAM))


async def up(settings: WeatherlightSettings, *, epochs: int | None, summary_json: Path | None,
             console: Console, trainer: bool = True) -> int:
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="weatherlight")
    life = Lifecycle("weatherlight", drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    t0 = time.monotonic()
    sup = Supervisor(settings, resolve(settings.services),
                     trainer_env={} if epochs is None else {"TOLARIA_EPOCHS": str(epochs)})
    run = _Run()
    try:
        run.started = await _start(sup, life.stop_event, console)
        if run.started:
            await _serve(sup, run, epochs=epochs, trainer=trainer, stop=life.stop_event, console=console)
    except StartupError as e:
        console.print(f"[red]fleet start-up failed[/]: {e}")
        run.started = False
    finally:
        with console.status("stopping the fleet"):
            outcome = await sup.shutdown()
    if not run.started:
        return EXIT_FAILED if not life.stopping else EXIT_INTERRUPTED
    summary = _summarise(sup, run, outcome, summary_json, console, duration_s=time.monotonic() - t0)
    return _exit_code(run, outcome, summary, trainer=trainer)


async def _start(sup: Supervisor, stop: asyncio.Event, console: Console) -> bool:
    """Start the fleet; False when the user interrupted start-up (StartupError propagates)."""
    with console.status("starting the fleet: redis, " + ", ".join(s.name for s in sup.specs)):
        start = asyncio.create_task(sup.start())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return False
        start.result()
    return True


async def _serve(sup: Supervisor, run: _Run, *, epochs: int | None, trainer: bool, stop: asyncio.Event,
                 console: Console) -> None:
    """Watch the fleet (and train) until the trainer finishes (with `epochs`) or the user stops it."""
    s = sup.settings
    http: HealthServer | None = None
    if s.metrics_port >= 0:
        http = HealthServer(sup.registry, sup.health, host=s.metrics_host, port=s.metrics_port)
        await http.start()
    write_bytes_atomic(sup.var_dir / "fleet.json", json.dumps(sup.describe(), indent=2).encode())
    console.print(f"[green]fleet ready[/]: {len(sup.children)} services; ports, pids and logs in "
                  f"{sup.var_dir}/fleet.json" + (f"; weatherlight metrics {http.url}/metrics" if http else ""))
    dl_start = await asyncio.to_thread(_dead_letters, sup.redis_url)
    watch = asyncio.Event()
    tasks = [asyncio.create_task(sup.watch(watch)), asyncio.create_task(sup.emergency_consumer().run(watch))]
    try:
        if trainer:
            run.summary_path = sup.var_dir / "tolaria" / f"summary-{int(time.time())}.json"
            sup.start_trainer({"TOLARIA_SUMMARY_JSON": str(run.summary_path)})
        if epochs is None:
            console.print("the fleet runs until Ctrl-C")
            await stop.wait()
        else:
            await _follow_training(sup, epochs, stop, console)
            run.interrupted = not sup.trainer_done.is_set()
        run.dead_letters = await asyncio.to_thread(_dead_letters, sup.redis_url) - dl_start
    finally:
        watch.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if http is not None:
            await http.stop()


def _summarise(sup: Supervisor, run: _Run, outcome: FleetOutcome, summary_json: Path | None, console: Console,
               *, duration_s: float) -> dict[str, Any] | None:
    if run.summary_path is None:
        return None
    if not run.summary_path.exists():
        console.print("[yellow]the trainer wrote no summary[/]")
        return None
    summary = fleet_summary(json.loads(run.summary_path.read_text()), dead_letters=run.dead_letters,
                            emergency_signals=sup.mode.signals, system_mode=sup.mode.name(time.monotonic()),
                            restarts=outcome.restarts, trainer_exit=outcome.trainer_exit,
                            fleet_clean=outcome.clean_shutdown, duration_s=duration_s)
    print_summary(summary, console)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(summary_json, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        console.print(f"summary written to {summary_json}")
    return summary


def _exit_code(run: _Run, outcome: FleetOutcome, summary: dict[str, Any] | None, *, trainer: bool) -> int:
    if run.interrupted:
        return EXIT_INTERRUPTED
    if outcome.trainer_exit == 3:
        return EXIT_HALTED
    if trainer and (outcome.trainer_exit != 0 or summary is None):
        return EXIT_FAILED
    if not outcome.clean_shutdown or (summary is not None and not summary["clean_shutdown"]):
        return EXIT_UNCLEAN
    return EXIT_OK


async def _follow_training(sup: Supervisor, epochs: int, stop: asyncio.Event, console: Console) -> None:
    """A progress bar fed by the trainer's /healthz until it exits or the user interrupts."""
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"), TimeElapsedColumn(),
               TextColumn("{task.fields[mode]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=epochs, mode="")
        while not sup.trainer_done.is_set() and not stop.is_set():
            answer = await sup.trainer.healthz() if sup.trainer is not None else None
            if answer is not None:
                progress.update(task, completed=min(epochs, int(answer[1].get("epoch", 0))),
                                mode=f"mode {sup.mode.name(time.monotonic())}")
            await asyncio.sleep(0.5)
        if sup.trainer_done.is_set():
            progress.update(task, completed=epochs)
