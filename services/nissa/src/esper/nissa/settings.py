"""Nissa's one typed settings object: bus settings (``ESPER_*``) plus ``NISSA_*`` knobs."""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from esper.oona.settings import OonaSettings


def _n(name: str) -> AliasChoices:
    return AliasChoices(f"NISSA_{name.upper()}")


class NissaSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "nissa"
    metrics_port: int = Field(9100, ge=-1, le=65535,
                              validation_alias=AliasChoices("NISSA_METRICS_PORT", "ESPER_METRICS_PORT"),
                              description="/metrics, /healthz, /alerts (prototype 9100; 0 picks a free port)")
    group: str = Field("nissa", validation_alias=_n("group"),
                       description="consumer group on telemetry and field_report (predefined in the channel table)")
    telemetry_freshness_ms: int = Field(900_000, gt=0, validation_alias=_n("telemetry_freshness_ms"),
                                        description="oldest telemetry envelope accepted: a backlog survives a restart")
    field_report_freshness_ms: int = Field(3_600_000, gt=0, validation_alias=_n("field_report_freshness_ms"),
                                           description="oldest field report envelope accepted (as Simic)")
    eval_interval_s: float = Field(10.0, gt=0, validation_alias=_n("eval_interval_s"),
                                   description="period of rate alerts (timeouts, dead letters, emergencies) and SLOs")
    publish_alert_events: bool = Field(True, validation_alias=_n("publish_alert_events"),
                                       description="announce alert transitions as nissa telemetry events")

    alert_coverage_min: float = Field(0.7, ge=0, le=1, validation_alias=_n("alert_coverage_min"),
                                      description="tamiyo_coverage_low fires below this (prototype 0.7)")
    alert_emergency_per_min: float = Field(10.0, ge=0, validation_alias=_n("alert_emergency_per_min"),
                                           description="emergency_rate_high fires above this many in the last minute")

    decision_slo_objective: float = Field(0.99, gt=0, lt=1, validation_alias=_n("decision_slo_objective"),
                                          description="share of decisions that must arrive within the deadline")
    training_slo_objective: float = Field(0.99, gt=0, lt=1, validation_alias=_n("training_slo_objective"),
                                          description="share of training steps that must raise no emergency")
    slo_window_s: float = Field(2_592_000.0, gt=0, validation_alias=_n("slo_window_s"),
                                description="error-budget window (prototype 720 h); counts reset on restart")
    slo_long_window_s: float = Field(3600.0, gt=0, validation_alias=_n("slo_long_window_s"),
                                     description="burn-rate window: esper_slo_burn_rate and the alert")
    slo_short_window_s: float = Field(300.0, gt=0, validation_alias=_n("slo_short_window_s"),
                                      description="the burn alert's confirmation window (SRE multiwindow)")
    slo_burn_threshold: float = Field(0.4, gt=0, validation_alias=_n("slo_burn_threshold"),
                                      description="slo_burn_* alerts fire above this burn rate (prototype 0.4)")
    slo_min_events: int = Field(10, ge=0, validation_alias=_n("slo_min_events"),
                                description="burn alerts wait for this many events in the long window")

    max_seed_series: int = Field(64, ge=1, validation_alias=_n("max_seed_series"),
                                 description="cap on esper_seed_alpha{seed_id} series")
    max_breaker_series: int = Field(32, ge=1, validation_alias=_n("max_breaker_series"),
                                    description="cap on esper_breaker_state{breaker} series")

    @model_validator(mode="after")
    def _windows_nest(self) -> NissaSettings:
        if not self.slo_short_window_s <= self.slo_long_window_s <= self.slo_window_s:
            raise ValueError("need NISSA_SLO_SHORT_WINDOW_S <= NISSA_SLO_LONG_WINDOW_S <= NISSA_SLO_WINDOW_S")
        return self
