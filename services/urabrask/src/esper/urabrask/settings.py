"""Urabrask's one typed settings object: bus settings (`ESPER_*`), the Urza files it reads and writes
(`URZA_DATABASE_URL`, `URZA_ARTIFACT_DIR`) and the prototype's `URABRASK_*` knobs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from esper.oona.settings import OonaSettings
from esper.urza.settings import sqlite_path


def _u(name: str) -> AliasChoices:
    return AliasChoices(f"URABRASK_{name.upper()}")


class UrabraskSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "urabrask"
    database_url: str = Field("sqlite:///./var/urza/catalog.db", validation_alias="URZA_DATABASE_URL",
                              description="Urza's SQLite catalogue (shared with Urza)")
    artifact_dir: Path = Field(Path("./var/urza/artifacts"), validation_alias="URZA_ARTIFACT_DIR",
                              description="Urza's artifact files")
    producer_interval_s: float = Field(300.0, gt=0, validation_alias=_u("producer_interval_s"),
                                       description="how often kernels without a current BSDS are probed")
    topn_per_cycle: int = Field(0, ge=0, validation_alias=_u("topn_per_cycle"),
                                description="kernels probed per cycle; 0 = all due (prototype 5)")
    only_safe_tier: bool = Field(False, validation_alias=_u("only_safe_tier"),
                                 description="probe SAFE blueprints only (prototype default true; off here so "
                                             "quarantine hazards are measured too)")
    oona_publish_enabled: bool = Field(True, validation_alias=_u("oona_publish_enabled"),
                                       description="announce sheets on `bsds` (the catalogue is written either way)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias=_u("device"),
                                                   description="where probes run; auto picks CUDA when present")
    seed: int = Field(0, validation_alias=_u("seed"), description="probe RNG seed")
    busy_timeout_ms: int = Field(10_000, gt=0, validation_alias=_u("busy_timeout_ms"),
                                 description="SQLite busy timeout")

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        sqlite_path(value)
        return value

    @property
    def db_path(self) -> Path:
        return sqlite_path(self.database_url)
