"""Weatherlight's plain logic: restart backoff, the system mode, the fleet's wiring, the summary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from esper.core.errors import ConfigurationError
from esper.leyline import pb
from esper.weatherlight.backoff import restart_delay_s
from esper.weatherlight.fleet import SERVICES, child_env, resolve
from esper.weatherlight.mode import SystemMode
from esper.weatherlight.summary import REQUIRED_KEYS, fleet_summary


def test_backoff_doubles_to_the_cap_without_jitter() -> None:
    delays = [restart_delay_s(n, min_s=1.0, max_s=30.0, jitter=0.0) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_jitter_stays_in_band_and_varies() -> None:
    rng = random.Random(7)
    delays = [restart_delay_s(3, min_s=1.0, max_s=30.0, jitter=0.25, rng=rng) for _ in range(200)]
    assert all(3.0 <= d <= 5.0 for d in delays)
    assert len(set(delays)) > 100  # jitter: services that crashed together do not restart together
    assert max(restart_delay_s(10, min_s=1.0, max_s=30.0, jitter=0.25, rng=rng) for _ in range(200)) <= 30.0


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        restart_delay_s(0, min_s=1.0, max_s=30.0, jitter=0.0)


def test_mode_escalates_holds_and_decays() -> None:
    mode = SystemMode(hold_s=60.0)
    assert mode.name(0.0) == "NORMAL"
    mode.observe(pb.EMERGENCY_LEVEL_NOTICE, 0.0)
    mode.observe(pb.EMERGENCY_LEVEL_CONSERVATIVE, 10.0)
    mode.observe(pb.EMERGENCY_LEVEL_NOTICE, 20.0)
    assert mode.level(30.0) == pb.EMERGENCY_LEVEL_CONSERVATIVE  # a lower signal does not lower the mode
    assert mode.level(75.0) == pb.EMERGENCY_LEVEL_NOTICE  # CONSERVATIVE aged out, NOTICE (t=20) has not
    assert mode.name(81.0) == "NORMAL"
    assert mode.signals == 3


def test_halt_never_decays() -> None:
    mode = SystemMode(hold_s=1.0)
    mode.observe(pb.EMERGENCY_LEVEL_HALT, 0.0)
    assert mode.name(1e6) == "HALT"


def test_a_level_this_schema_does_not_define_keeps_the_mode_readable() -> None:
    """A newer peer's level (proto3 keeps the number) is named, not raised on every later read."""
    mode = SystemMode(hold_s=60.0)
    mode.observe(99, 0.0)  # type: ignore[arg-type]
    assert mode.name(1.0) == "UNKNOWN_99"
    assert mode.name(61.0) == "NORMAL"


def test_resolve_puts_oona_first_and_refuses_unknown_names() -> None:
    assert [s.name for s in resolve(["tamiyo", "oona", "urza", "tamiyo"])] == ["oona", "tamiyo", "urza"]
    with pytest.raises(ConfigurationError, match="nope"):
        resolve(["oona", "nope"])
    with pytest.raises(ConfigurationError):
        resolve(["tolaria"])  # the trainer is the fleet's job, not a service to keep alive


def test_every_service_runs_as_its_container_would() -> None:
    for spec in SERVICES.values():
        assert spec.argv == ("-m", f"esper.{spec.name}", "run")


def test_child_env_passes_user_knobs_and_owns_the_bus(tmp_path: Path) -> None:
    user = {"TAMIYO_POLICY": "heuristic", "URZA_ARTIFACT_DIR": "/mine", "ESPER_REDIS_URL": "redis://elsewhere",
            "ESPER_INSTANCE_ID": "shared", "PATH": "/usr/bin"}
    env = child_env(user, redis_url="redis://127.0.0.1:1/0", secret="s3", var_dir=tmp_path, metrics_port=4242,
                    overrides={"TOLARIA_EPOCHS": "2"})
    assert env["TAMIYO_POLICY"] == "heuristic" and env["PATH"] == "/usr/bin"
    assert env["URZA_ARTIFACT_DIR"] == "/mine"  # the user's own path wins
    assert env["TAMIYO_VAR_DIR"] == str(tmp_path.resolve() / "tamiyo")
    assert env["ESPER_REDIS_URL"] == "redis://127.0.0.1:1/0" and env["ESPER_LEYLINE_SECRET"] == "s3"
    assert env["ESPER_METRICS_PORT"] == "4242" and env["TOLARIA_EPOCHS"] == "2"
    assert "ESPER_INSTANCE_ID" not in env  # replicas must not share an instance id
    assert user["ESPER_REDIS_URL"] == "redis://elsewhere"  # the caller's mapping is untouched


def _trainer(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "epochs": 3, "final_val_accuracy": 0.9, "decisions": 40, "decision_p50_ms": 4.0, "decision_p99_ms": 9.0,
        "timeouts": 2, "emergencies": 0, "seeds_fossilized": 1, "seeds_culled": 1, "clean_shutdown": True,
        "seeds_by_stage": {"FOSSILIZED": 1, "DORMANT": 1}}
    return {**base, **kw}


def test_summary_has_the_flat_keys_and_counts_the_fleet() -> None:
    s = fleet_summary(_trainer(), dead_letters=5, emergency_signals=1, system_mode="NORMAL",
                      restarts={"tamiyo": 2}, trainer_exit=0, fleet_clean=True, duration_s=12.34)
    assert set(REQUIRED_KEYS) <= set(s)
    assert s["dead_letters"] == 5 and s["restarts"] == 2 and s["clean_shutdown"] is True
    assert s["seeds_fossilized_final"] == 1 and s["duration_s"] == 12.3


@pytest.mark.parametrize(("trainer_clean", "fleet_clean"), [(False, True), (True, False)])
def test_summary_clean_shutdown_needs_trainer_and_fleet(trainer_clean: bool, fleet_clean: bool) -> None:
    s = fleet_summary(_trainer(clean_shutdown=trainer_clean), dead_letters=0, emergency_signals=0,
                      system_mode="NORMAL", restarts={}, trainer_exit=0, fleet_clean=fleet_clean, duration_s=1.0)
    assert s["clean_shutdown"] is False
