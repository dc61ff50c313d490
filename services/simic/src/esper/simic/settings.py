"""Simic's one typed settings object: bus settings (`ESPER_*`) plus `SIMIC_*` knobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from esper.oona.settings import OonaSettings


def _s(name: str) -> AliasChoices:
    return AliasChoices(f"SIMIC_{name.upper()}", name)


class SimicSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "simic"
    group: str = Field("simic", validation_alias=_s("group"), description="consumer group on field_report")
    replay_path: Path = Field(Path("./var/simic/replay.db"), validation_alias=_s("replay_path"),
                              description="the replay store (SQLite)")
    retention_hours: float = Field(24.0, gt=0, validation_alias=_s("retention_hours"),
                                   description="reports issued longer ago are pruned (prototype: 24 h)")
    field_report_freshness_ms: int = Field(3_600_000, gt=0, validation_alias=_s("field_report_freshness_ms"),
                                           description="oldest envelope accepted: a backlog survives an outage")
