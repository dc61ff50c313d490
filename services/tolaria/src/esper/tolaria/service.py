"""`python -m esper.tolaria`: one training run, then exit with its summary.

The trainer runs in the main thread; the bus (decisions, kernels, telemetry, /metrics) on the bus
thread. SIGTERM or SIGINT (Ctrl-C) finishes the current step, checkpoints and exits cleanly; both stay
handled until the summary is written, so a second one during shutdown loses nothing. The summary is
written (atomically) on every exit path, `clean_shutdown` false when the run raised. Exit codes: 0 run
finished, 3 the run halted on an emergency (HALT), 2 configuration error: settings, device, dataset
or a metrics port already in use, one line on stderr, not a traceback; 1 the bus could not reach
Redis at start (`TrainerStartError`, one line too).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from esper.core.errors import ConfigurationError, EsperError
from esper.core.files import write_bytes_atomic
from esper.core.health_server import HealthServer
from esper.core.logging import configure_logging, get_logger
from esper.tolaria.bus import BusThread
from esper.tolaria.data import Dataset, load_dataset
from esper.tolaria.heap import keep_freed_memory
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer

log = get_logger("esper.tolaria.service")

EXIT_HALTED = 3


class TrainerStartError(EsperError):
    """The run could not start: the bus did not reach Redis in time (nothing trained, nothing written)."""


def load_training_data(settings: TolariaSettings) -> Dataset:
    """The run's dataset; raises `DatasetError` for a bad TOLARIA_DATASET_PATH, so callers check it first."""
    return load_dataset(settings.dataset_path, seed=settings.seed, val_fraction=settings.val_fraction)


def run_training(settings: TolariaSettings, *, static: bool = False,
                 dataset: Dataset | None = None) -> tuple[int, dict[str, Any]]:
    """Train once; returns (exit code, summary). `static`: no control plane at all (baseline).

    `dataset`: already loaded (the CLI does, to report a bad file as a configuration error); loaded
    here otherwise, before the bus starts, so a `DatasetError` leaves no thread behind.
    """
    data = dataset if dataset is not None else load_training_data(settings)
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="tolaria")
    heap = keep_freed_memory(settings.malloc_keep_mb)
    log.info("heap", kept_mb=heap.keep_mb, applied=heap.applied, reason=heap.reason or None)
    registry = CollectorRegistry()
    bus = None if static else BusThread(settings, registry=registry)
    http: HealthServer | None = None
    trainer: Trainer | None = None

    def health() -> tuple[bool, Mapping[str, object]]:
        if trainer is None:
            return True, {"starting": True}
        return True, {"epoch": trainer.epoch, "step": trainer.step, "halted": trainer.emergency.halted}

    try:
        if bus is not None:
            try:
                bus.start()
            except TimeoutError as e:  # connect() retries with backoff until the call gives up
                raise TrainerStartError("the bus could not reach Redis (ESPER_REDIS_URL) within 30 s") from e
            if settings.metrics_port >= 0:
                server = HealthServer(registry, health, host=settings.metrics_host, port=settings.metrics_port)
                try:
                    bus.call(server.start(), 10.0)
                except OSError as e:
                    raise ConfigurationError(f"ESPER_METRICS_PORT {settings.metrics_port}: {e.strerror or e}") from e
                http = server
        trainer = Trainer(settings, bus=bus, registry=registry, dataset=data)
    except BaseException:
        _stop_bus(bus, http)
        raise
    # Handled until the summary is written: a signal during shutdown must not kill it half-done.
    previous = {sig: signal.signal(sig, lambda *_: trainer.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    clean = False
    try:
        trainer.run()
        clean = True
    finally:
        summary = trainer.summary(clean_shutdown=clean) | {"heap_kept_mb": heap.keep_mb if heap.applied else 0}
        try:
            trainer.close()
            summary |= trainer.emergency_delivery()  # after close's flush: what is still pending is on disk
            _stop_bus(bus, http)
            if settings.summary_json is not None:
                settings.summary_json.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(settings.summary_json,
                                   (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    log.info("run finished", epochs=summary["epochs"], val_accuracy=summary["final_val_accuracy"],
             decisions=summary["decisions"], fossilized=summary["seeds_fossilized"], culled=summary["seeds_culled"])
    return (EXIT_HALTED if summary["halted"] else 0), summary


def _stop_bus(bus: BusThread | None, http: HealthServer | None) -> None:
    if bus is None:
        return
    if http is not None:
        bus.call(http.stop(), 10.0)
    bus.stop()
