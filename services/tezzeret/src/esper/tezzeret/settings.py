"""Tezzeret's one typed settings object: the bus settings (`ESPER_*`), the Urza files it writes
(the same `URZA_DATABASE_URL` / `URZA_ARTIFACT_DIR` Urza reads) and its own `TEZZERET_*` knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from esper.core.errors import ConfigurationError
from esper.karn.template import KarnError, SlotShape
from esper.oona.settings import OonaSettings
from esper.urza.settings import sqlite_path


def _t(name: str) -> AliasChoices:
    return AliasChoices(f"TEZZERET_{name.upper()}")


class TezzeretSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "tezzeret"
    database_url: str = Field("sqlite:///./var/urza/catalog.db", validation_alias="URZA_DATABASE_URL",
                              description="Urza's SQLite catalogue (shared with Urza)")
    artifact_dir: Path = Field(Path("./var/urza/artifacts"), validation_alias="URZA_ARTIFACT_DIR",
                              description="Urza's artifact files (shared with Urza and Kasmina)")
    slots: list[str] = Field(["v64"], validation_alias=_t("slots"),
                             description="slot keys to compile every fitting blueprint for (JSON list)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias=_t("device"),
                                                   description="auto picks CUDA when present")
    enable_compile: bool = Field(True, validation_alias=_t("enable_compile"),
                                 description="torch.compile the warm-up on CUDA (CPU is always eager)")
    max_attempts: int = Field(2, ge=1, validation_alias=_t("max_attempts"),
                              description="standard, then conservative compile attempts per blueprint")
    seed: int = Field(0, validation_alias=_t("seed"), description="RNG seed of every artifact's initial weights")
    interval_s: float = Field(300.0, gt=0, validation_alias=_t("interval_s"),
                              description="how often the forge looks for blueprints without a current kernel")
    busy_timeout_ms: int = Field(10_000, gt=0, validation_alias=_t("busy_timeout_ms"),
                                 description="SQLite busy timeout (Urza and Urabrask write the catalogue too)")

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        sqlite_path(value)
        return value

    @field_validator("slots")
    @classmethod
    def _slot_keys(cls, value: list[str]) -> list[str]:
        try:
            return [SlotShape.from_key(v).as_key() for v in value]
        except KarnError as e:
            raise ConfigurationError(f"TEZZERET_SLOTS: {e}") from e

    @property
    def db_path(self) -> Path:
        return sqlite_path(self.database_url)
