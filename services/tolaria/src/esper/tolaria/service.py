"""`python -m esper.tolaria`: one training run, then exit with its summary.

The trainer runs in the main thread; the bus (decisions, kernels, telemetry, /metrics) on the bus
thread. SIGTERM finishes the current step, checkpoints and exits cleanly. Exit codes: 0 run finished,
3 the run halted on an emergency (HALT), 2 configuration error: settings, device or dataset, all
checked by the CLI before anything starts (a bad `.npz` is one line on stderr, not a traceback).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from esper.core.health_server import HealthServer
from esper.core.logging import configure_logging, get_logger
from esper.tolaria.bus import BusThread
from esper.tolaria.data import Dataset, load_dataset
from esper.tolaria.heap import keep_freed_memory
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer

log = get_logger("esper.tolaria.service")

EXIT_HALTED = 3


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
    if bus is not None:
        bus.start()
    try:
        trainer = Trainer(settings, bus=bus, registry=registry, dataset=data)
    except BaseException:
        if bus is not None:
            bus.stop()
        raise

    def health() -> tuple[bool, Mapping[str, object]]:
        return True, {"epoch": trainer.epoch, "step": trainer.step, "halted": trainer.emergency.halted}

    if bus is not None and settings.metrics_port >= 0:
        http = HealthServer(registry, health, host=settings.metrics_host, port=settings.metrics_port)
        bus.call(http.start(), 10.0)
    previous = signal.signal(signal.SIGTERM, lambda *_: trainer.stop())
    clean = False
    try:
        trainer.run()
        clean = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary = trainer.summary(clean_shutdown=clean) | {"heap_kept_mb": heap.keep_mb if heap.applied else 0}
        trainer.close()
        if bus is not None:
            if http is not None:
                bus.call(http.stop(), 10.0)
            bus.stop()
    if settings.summary_json is not None:
        settings.summary_json.parent.mkdir(parents=True, exist_ok=True)
        settings.summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("run finished", epochs=summary["epochs"], val_accuracy=summary["final_val_accuracy"],
             decisions=summary["decisions"], fossilized=summary["seeds_fossilized"], culled=summary["seeds_culled"])
    return (EXIT_HALTED if summary["halted"] else 0), summary
