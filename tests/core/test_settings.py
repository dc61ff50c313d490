"""EsperSettings: defaults, environment, .env, subclassing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from esper.core.errors import ConfigurationError, DependencyViolationError, EsperError
from esper.core.settings import EsperSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("ESPER_", "TAMIYO_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env from the repository


def test_defaults() -> None:
    settings = EsperSettings()
    assert settings.service_name == "esper"
    assert settings.instance_id == f"{socket.gethostname()}-{os.getpid()}"
    assert settings.redis_url is None
    assert (settings.log_level, settings.log_format) == ("INFO", "console")
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 0)
    assert (settings.heartbeat_interval_s, settings.heartbeat_ttl_s, settings.drain_timeout_s) == (5.0, 15.0, 10.0)
    assert all(field.description for field in EsperSettings.model_fields.values())


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("ESPER_METRICS_PORT", "-1")
    monkeypatch.setenv("ESPER_LOG_FORMAT", "json")
    monkeypatch.setenv("ESPER_UNRELATED", "ignored")
    settings = EsperSettings()
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert settings.metrics_port == -1
    assert settings.log_format == "json"


def test_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ESPER_SERVICE_NAME=oona\nESPER_HEARTBEAT_TTL_S=30\n", encoding="utf-8")
    settings = EsperSettings()
    assert settings.service_name == "oona"
    assert settings.heartbeat_ttl_s == 30.0


@pytest.mark.parametrize(("key", "value"), [("ESPER_LOG_FORMAT", "xml"), ("ESPER_METRICS_PORT", "-2")])
def test_invalid_values_fail_at_construction(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        EsperSettings()


class TamiyoSettings(EsperSettings):
    model_config = SettingsConfigDict(env_prefix="TAMIYO_")

    step_timeout_ms: float = 5.0


def test_subclass_with_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "7.5")
    monkeypatch.setenv("TAMIYO_SERVICE_NAME", "tamiyo")
    settings = TamiyoSettings()
    assert settings.step_timeout_ms == 7.5
    assert settings.service_name == "tamiyo"
    assert settings.model_config["extra"] == "ignore"


def test_error_tree() -> None:
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, EsperError)
    assert issubclass(DependencyViolationError, EsperError)
