"""Settings that used to pass silently: an out-of-range seed, empty values, unknown or conflicting names."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from esper.core.errors import ConfigurationError
from esper.tolaria.settings import TolariaSettings


def test_seed_fits_the_splitters_random_state(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TolariaSettings(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ValidationError, match="less than or equal to 4294967295"):
        TolariaSettings(seed=2**32)  # sklearn would refuse it later, reported as a dataset split error
    monkeypatch.setenv("TOLARIA_SEED", str(2**32))
    with pytest.raises(ValidationError, match="TOLARIA_SEED"):
        TolariaSettings()


@pytest.mark.parametrize("name", ["TOLARIA_PROFILER_DIR", "TOLARIA_SUMMARY_JSON", "TOLARIA_DATASET_PATH",
                                  "TOLARIA_DECISION_SIDECAR_CORES"])
def test_an_empty_variable_means_unset(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, "")  # `TOLARIA_PROFILER_DIR=` in a compose file: not Path(".")
    s = TolariaSettings()
    assert (s.profiler_dir, s.summary_json, s.dataset_path, s.decision_sidecar_cores) == (None, None, None, None)
    assert not s.profiler_enabled
    monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(f"{name}=\n")
    assert not TolariaSettings().profiler_enabled and TolariaSettings().summary_json is None


def test_unknown_tolaria_names_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOLARIA_EPOCH", "3")
    with pytest.raises(ConfigurationError, match=r"TOLARIA_EPOCH \(the environment; did you mean TOLARIA_EPOCHS\?"):
        TolariaSettings()
    monkeypatch.delenv("TOLARIA_EPOCH")
    (tmp_path / ".env").write_text("TOLARIA_ROLLBACK_DEADLINE=10\n")
    with pytest.raises(ConfigurationError, match=r"_DEADLINE \(\.env; did you mean TOLARIA_ROLLBACK_DEADLINE_MS\?"):
        TolariaSettings()
    (tmp_path / ".env").write_text("TOLARIA_XYZZY=1\n")
    with pytest.raises(ConfigurationError, match=r"TOLARIA_XYZZY \(\.env\)"):  # no far-fetched suggestion
        TolariaSettings()
    assert TolariaSettings(_env_file=None).rollback_deadline_ms == 250.0  # type: ignore[call-arg]
    monkeypatch.setenv("ESPER_SOMETHING_ELSE", "1")  # the shared ESPER_ namespace is not Tolaria's
    monkeypatch.setenv("TAMIYO_POLICY_DIR", "/tmp")
    assert TolariaSettings(_env_file=None).epochs == 20  # type: ignore[call-arg]


def test_aliases_of_one_setting_must_agree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOLARIA_LR", "0.1")
    monkeypatch.setenv("TOLARIA_LEARNING_RATE", "0.001")
    with pytest.raises(ConfigurationError,
                       match=r"in the environment: TOLARIA_LR='0\.1'.*TOLARIA_LEARNING_RATE='0\.001'"):
        TolariaSettings()
    monkeypatch.setenv("TOLARIA_LEARNING_RATE", "0.1")
    assert TolariaSettings().learning_rate == 0.1
    monkeypatch.delenv("TOLARIA_LEARNING_RATE")
    (tmp_path / ".env").write_text("TOLARIA_LEARNING_RATE=0.5\n")  # the other alias, in .env: overridden
    assert TolariaSettings().learning_rate == 0.1
    (tmp_path / ".env").write_text("TOLARIA_LR=0.5\n")  # the same name: the environment wins, as always
    assert TolariaSettings().learning_rate == 0.1
    monkeypatch.delenv("TOLARIA_LR")
    (tmp_path / ".env").write_text("TOLARIA_LR=0.5\nTOLARIA_LEARNING_RATE=0.05\n")  # both in .env
    with pytest.raises(ConfigurationError, match=r"in \.env: TOLARIA_LR='0\.5'"):
        TolariaSettings()
