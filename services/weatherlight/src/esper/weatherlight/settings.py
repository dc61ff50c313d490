"""Weatherlight's one typed settings object: bus settings (`ESPER_*`) plus `WEATHERLIGHT_*` knobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from esper.oona.settings import OonaSettings


def _w(name: str) -> AliasChoices:
    return AliasChoices(f"WEATHERLIGHT_{name.upper()}")


class WeatherlightSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "weatherlight"
    var_dir: Path = Field(Path("./var"), validation_alias=_w("var_dir"),
                          description="root of every service's durable state (catalogue, policies, checkpoints, "
                                      "replay store) and of the fleet's logs")
    services: list[str] = Field(
        ["oona", "urza", "tezzeret", "urabrask", "tamiyo", "simic", "nissa"], validation_alias=_w("services"),
        description="long-running services to start, in start order (the trainer, tolaria, is the fleet's job)")
    restart_min_s: float = Field(1.0, gt=0, validation_alias=_w("restart_min_s"),
                                 description="first restart delay of a crashed service (prototype: 1 s)")
    restart_max_s: float = Field(30.0, gt=0, validation_alias=_w("restart_max_s"),
                                 description="restart delay cap (prototype: 30 s)")
    restart_jitter: float = Field(0.25, ge=0, le=1, validation_alias=_w("restart_jitter"),
                                  description="± fraction of random jitter on each delay (prototype: 25%)")
    stable_after_s: float = Field(60.0, gt=0, validation_alias=_w("stable_after_s"),
                                  description="a service up this long has its backoff reset")
    ready_timeout_s: float = Field(180.0, gt=0, validation_alias=_w("ready_timeout_s"),
                                   description="how long a service may take to answer /healthz before start-up fails")
    poll_s: float = Field(0.2, gt=0, validation_alias=_w("poll_s"),
                          description="how often children are polled for exit and readiness")
    stop_timeout_s: float = Field(20.0, gt=0, validation_alias=_w("stop_timeout_s"),
                                  description="SIGTERM grace per process before SIGKILL on shutdown")
    mode_hold_s: float = Field(60.0, gt=0, validation_alias=_w("mode_hold_s"),
                               description="the system mode stays at an emergency level this long after its "
                                           "last signal, then steps down")
    emergency_group: str = Field("weatherlight", validation_alias=_w("emergency_group"),
                                 description="consumer group on the emergency channel")
