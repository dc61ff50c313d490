"""The run summary `esper up --epochs N` prints and writes: the trainer's own summary, flattened and
joined with what only the supervisor knows (dead letters, restarts, the system mode, shutdown)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

REQUIRED_KEYS = ("epochs", "final_val_accuracy", "decisions", "decision_p50_ms", "decision_p99_ms", "timeouts",
                 "emergencies", "dead_letters", "seeds_fossilized", "seeds_culled", "clean_shutdown")


def fleet_summary(trainer: Mapping[str, Any], *, dead_letters: int, emergency_signals: int, system_mode: str,
                  restarts: Mapping[str, int], trainer_exit: int | None, fleet_clean: bool,
                  duration_s: float) -> dict[str, Any]:
    """Flat keys (REQUIRED_KEYS at least). `clean_shutdown` holds only when the trainer finished
    cleanly *and* every process stopped on SIGTERM and Redis went down."""
    out: dict[str, Any] = {k: trainer.get(k) for k in REQUIRED_KEYS if k in trainer}
    for key in ("run_id", "steps", "final_val_loss", "decision_commands", "decision_failures", "commands_applied",
                "seed_parameters", "host_parameters", "halted", "emergency_level"):
        if key in trainer:
            out[key] = trainer[key]
    for stage, n in dict(trainer.get("seeds_by_stage") or {}).items():
        out[f"seeds_{str(stage).lower()}_final"] = n
    out.update({
        "epochs": trainer.get("epochs", 0),
        "decisions": trainer.get("decisions", 0),
        "timeouts": trainer.get("timeouts", 0),
        "emergencies": trainer.get("emergencies", 0),
        "seeds_fossilized": trainer.get("seeds_fossilized", 0),
        "seeds_culled": trainer.get("seeds_culled", 0),
        "dead_letters": dead_letters,
        "emergency_signals": emergency_signals,
        "system_mode": system_mode,
        "restarts": sum(restarts.values()),
        "restarts_by_service": dict(restarts),
        "trainer_exit": trainer_exit,
        "clean_shutdown": bool(trainer.get("clean_shutdown")) and fleet_clean,
        "duration_s": round(duration_s, 1),
    })
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def print_summary(summary: Mapping[str, Any], console: Console) -> None:
    table = Table(title="esper run summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("epochs", "epochs"), ("validation accuracy", "final_val_accuracy"), ("decisions", "decisions"),
        ("decision latency p50 / p99 ms", None), ("timeouts", "timeouts"), ("emergencies", "emergencies"),
        ("emergency signals / system mode", None), ("dead letters", "dead_letters"),
        ("seeds fossilized", "seeds_fossilized"), ("seeds culled", "seeds_culled"),
        ("seeds by final stage", None), ("restarts", "restarts_by_service"), ("clean shutdown", "clean_shutdown"),
        ("wall time s", "duration_s"),
    ]
    for label, key in rows:
        if key is not None:
            value = _fmt(summary.get(key))
        elif label.startswith("decision latency"):
            value = f"{_fmt(summary.get('decision_p50_ms'))} / {_fmt(summary.get('decision_p99_ms'))}"
        elif label.startswith("emergency signals"):
            value = f"{summary.get('emergency_signals')} / {summary.get('system_mode')}"
        else:
            stages = {k.removeprefix("seeds_").removesuffix("_final"): v for k, v in summary.items()
                      if k.startswith("seeds_") and k.endswith("_final")}
            value = _fmt(stages)
        table.add_row(label, value)
    console.print(table)
