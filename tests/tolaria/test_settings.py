"""Settings: prototype env names, Tamiyo's step timeout name, validation of paths, run ids and devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from esper.core.errors import ConfigurationError
from esper.oona import OonaSettings
from esper.tolaria.settings import TolariaSettings


def test_defaults_follow_the_prototype_and_the_architecture() -> None:
    s = TolariaSettings()
    assert (s.rollback_fast_cap_mb, s.rollback_deadline_ms, s.rollback_snapshot_steps) == (32.0, 250.0, 1)
    assert (s.emergency_bypass_max_per_min, s.emergency_l4_on_rollback_deadline, s.emergency_l4_failed_epochs) == (
        60, True, 3)
    assert (s.tamiyo_step_timeout_ms, s.decision_mode, s.epoch_budget_ms, s.hook_budget_ms) == (
        5.0, "pipelined", 250.0, 50.0)
    assert s.rollback_enabled and s.emergency_enabled and s.lr_policy == "off" and s.lr_warmup_steps == 0
    assert s.dataset_path is None and not s.profiler_enabled and s.service_name == "tolaria"
    assert s.run_id.startswith("run-") and s.run_id != TolariaSettings().run_id
    assert s.checkpoint_dir == Path("var/tolaria/checkpoints")
    assert s.emergency_spill_path == Path("var/tolaria/emergency_spill.db")
    assert s.rollback_fast_cap_bytes == 32 * 1024 * 1024
    assert s.optimizer_family_index == 1  # adam
    for name, field in TolariaSettings.model_fields.items():
        if name not in OonaSettings.model_fields or name == "service_name":
            assert field.description, f"{name} has no description"


def test_env_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "TOLARIA_ROLLBACK_ENABLED": "false", "TOLARIA_ROLLBACK_FAST_CAP_MB": "8", "TOLARIA_ROLLBACK_DEADLINE_MS": "100",
        "TOLARIA_ROLLBACK_SNAPSHOT_STEPS": "4", "TOLARIA_EMERGENCY_ENABLED": "0",
        "TOLARIA_EMERGENCY_BYPASS_MAX_PER_MIN": "30", "TOLARIA_EMERGENCY_L4_ON_ROLLBACK_DEADLINE": "false",
        "TOLARIA_EMERGENCY_L4_FAILED_EPOCHS": "5", "TOLARIA_LR_POLICY": "cosine", "TOLARIA_LR_WARMUP_STEPS": "10",
        "TOLARIA_EPOCHS": "3", "TOLARIA_BATCH_SIZE": "32", "TOLARIA_LR": "0.05", "TOLARIA_OPTIMIZER": "sgd",
        "TOLARIA_SEED": "9", "TOLARIA_DATASET_PATH": str(tmp_path / "d.npz"), "TOLARIA_DEVICE": "cpu",
        "TOLARIA_VAR_DIR": str(tmp_path / "var"), "TOLARIA_DECISION_MODE": "sync", "TAMIYO_STEP_TIMEOUT_MS": "7.5",
        "TOLARIA_MAX_STALENESS_STEPS": "1", "TOLARIA_EPOCH_BUDGET_MS": "500", "TOLARIA_HOOK_BUDGET_MS": "20",
        "TOLARIA_RUN_ID": "exp-7", "TOLARIA_PROFILER_DIR": str(tmp_path / "prof" / "run"),
        "ESPER_REDIS_URL": "redis://127.0.0.1:6390/0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = TolariaSettings()
    assert not s.rollback_enabled and not s.emergency_enabled and not s.emergency_l4_on_rollback_deadline
    assert (s.rollback_fast_cap_mb, s.rollback_deadline_ms, s.rollback_snapshot_steps) == (8.0, 100.0, 4)
    assert (s.emergency_bypass_max_per_min, s.emergency_l4_failed_epochs) == (30, 5)
    assert (s.lr_policy, s.lr_warmup_steps, s.epochs, s.batch_size, s.learning_rate) == ("cosine", 10, 3, 32, 0.05)
    assert (s.optimizer, s.optimizer_family_index, s.seed, s.device) == ("sgd", 0, 9, "cpu")
    assert s.dataset_path == tmp_path / "d.npz" and s.checkpoint_dir == tmp_path / "var" / "checkpoints"
    assert (s.decision_mode, s.tamiyo_step_timeout_ms, s.max_staleness_steps) == ("sync", 7.5, 1)
    assert (s.epoch_budget_ms, s.hook_budget_ms, s.run_id) == (500.0, 20.0, "exp-7")
    assert s.profiler_enabled and s.redis_url == "redis://127.0.0.1:6390/0"
    assert s.torch_device() == torch.device("cpu")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("optimizer", "rmsprop", "optimizer"),
    ("lr_policy", "linear", "lr_policy"),
    ("decision_mode", "async", "decision_mode"),
    ("run_id", "has space", "invalid run id"),
    ("run_id", "a{b}", "invalid run id"),
    ("dataset_path", "data.csv", ".npz"),
    ("rollback_snapshot_steps", 0, "greater than or equal"),
    ("emergency_bypass_max_per_min", 0, "greater than or equal"),
    ("rollback_deadline_ms", -1, "greater than or equal"),
])
def test_bad_values_are_refused(field: str, value: object, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TolariaSettings(**{field: value})


def test_profiler_runs_only_with_a_valid_output_directory(tmp_path: Path) -> None:
    assert TolariaSettings(profiler_dir=tmp_path).profiler_enabled
    assert TolariaSettings(profiler_dir=tmp_path / "new" / "deeper").profiler_enabled  # creatable
    a_file = tmp_path / "trace.txt"
    a_file.write_text("x")
    with pytest.raises(ValidationError, match="not a directory"):
        TolariaSettings(profiler_dir=a_file)
    with pytest.raises(ValidationError, match="cannot be created"):
        TolariaSettings(profiler_dir=a_file / "sub")


def test_an_unusable_summary_path_is_refused_at_start(tmp_path: Path) -> None:
    """It was found after the whole run: a traceback, exit 1, and no summary printed."""
    assert TolariaSettings(summary_json=tmp_path / "out" / "summary.json").summary_json is not None  # creatable
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ValidationError, match="cannot be created"):
        TolariaSettings(summary_json=a_file / "summary.json")
    with pytest.raises(ValidationError, match="is a directory"):
        TolariaSettings(summary_json=tmp_path)
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValidationError, match="dangling symlink"):  # mkdir failed on it after the run
        TolariaSettings(summary_json=dangling / "summary.json")
    with pytest.raises(ValidationError, match="dangling symlink"):
        TolariaSettings(profiler_dir=dangling)


def test_cuda_requested_without_cuda_is_a_configuration_error() -> None:
    s = TolariaSettings(device="cuda")
    if torch.cuda.is_available():
        assert s.torch_device().type == "cuda"
    else:
        with pytest.raises(ConfigurationError, match="CUDA"):
            s.torch_device()
    assert TolariaSettings(device="auto").torch_device().type in {"cpu", "cuda"}
