"""Tamiyo's one typed settings object: the bus settings (`ESPER_*`) plus Tamiyo's knobs, which keep
the prototype's `TAMIYO_*` names (REFERENCE_PROTOTYPE §5)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from esper.core.errors import ConfigurationError
from esper.oona.settings import OonaSettings


def _t(name: str) -> AliasChoices:
    """Accept the prototype's TAMIYO_<NAME> env var (and the field name in code)."""
    return AliasChoices(f"TAMIYO_{name.upper()}")


class TamiyoSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    service_name: str = "tamiyo"
    group: str = Field("tamiyo", validation_alias=_t("group"), description="consumer group on `state`")

    policy: Literal["gnn", "heuristic"] = Field("gnn", validation_alias=_t("policy"),
                                                description="gnn (learned) or heuristic (rule-based yardstick)")
    step_timeout_ms: float = Field(5.0, validation_alias=_t("step_timeout_ms"),
                                   description="decision budget when a request carries no deadline")
    reply_margin_ms: float = Field(0.5, validation_alias=_t("reply_margin_ms"),
                                   description="answer at least this long before the request's deadline")
    reply_margin_fraction: float = Field(0.1, validation_alias=_t("reply_margin_fraction"),
                                         description="... and at least this fraction of its budget before it")
    metadata_timeout_ms: float = Field(25.0, validation_alias=_t("metadata_timeout_ms"),
                                       description="budget of one blueprint-metadata fetch (prototype 25 ms)")
    metadata_cache_ttl_s: float = Field(300.0, validation_alias=_t("metadata_cache_ttl_s"),
                                        description="blueprint metadata TTL cache (prototype 5 min)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias=_t("device"),
                                                   description="auto picks CUDA when present")
    enable_compile: bool = Field(False, validation_alias=_t("enable_compile"),
                                 description="torch.compile the GNN on CUDA (warm-up once at start)")
    cpu_threads: int = Field(1, validation_alias=_t("cpu_threads"), description="torch intra-op threads on CPU")
    var_dir: Path = Field(Path("./var/tamiyo"), validation_alias=_t("var_dir"),
                          description="norms and registries (JSON, written atomically)")
    policy_dir: Path = Field(Path("./var/tamiyo/policies"), validation_alias=_t("policy_dir"),
                             description="policy checkpoints")
    verify_updates: bool = Field(True, validation_alias=_t("verify_updates"),
                                 description="updates must carry a newer, fresh issued_at (prototype default: off)")
    update_freshness_sec: float = Field(600.0, validation_alias=_t("update_freshness_sec"),
                                        description="oldest policy update accepted when verifying; 0 = no limit")
    conservative_mode: bool = Field(False, validation_alias=_t("conservative_mode"),
                                    description="start in conservative mode")
    breaker_failures_to_open: int = Field(3, validation_alias=_t("breaker_failures"),
                                          description="inference / metadata breakers open after this many")
    breaker_cooldown_ms: float = Field(100.0, validation_alias=_t("breaker_cooldown_ms"),
                                       description="open breaker cooldown before HALF_OPEN (prototype 100 ms)")
    conservative_timeouts: int = Field(3, validation_alias=_t("conservative_timeouts"),
                                       description="consecutive timeouts that enter conservative mode")
    germinate_min_remaining_steps: int = Field(
        75, ge=0, validation_alias=_t("germinate_min_remaining_steps"),
        description="a GERMINATE with fewer steps left in the run (Tolaria's steps_total) becomes PAUSE "
                    "(germinate_too_late): about Kasmina's default lifecycle to the end of probation; 0 = off")

    max_blueprints: int = Field(8, ge=1, le=64, validation_alias=_t("max_blueprints"),
                                description="candidate blueprints in a decision's graph: the catalogue's best "
                                            "ranked (not quarantined, fit the slot kind, lowest risk); Simic's "
                                            "SIMIC_MAX_BLUEPRINTS must be the same")
    cull_memory: bool = Field(True, validation_alias=_t("cull_memory"),
                              description="the GNN never grows a design again in a seed where Kasmina culled it "
                                          "earlier in the run (the rule-based policy always keeps this rule)")
    explore_epsilon: float = Field(0.0, ge=0.0, le=1.0, validation_alias=_t("explore_epsilon"),
                                   description="probability that a GNN GERMINATE takes a random candidate blueprint, "
                                               "drawn among the seed's designs this replica grew least, instead of "
                                               "the best-scoring one (exploration for Simic's data; 0 = always the "
                                               "best)")
    explore_seed: int = Field(0, ge=0, validation_alias=_t("explore_seed"),
                              description="seeds the exploration draws (reproducible runs)")

    enable_blend_mode_ann: bool = Field(False, validation_alias=_t("enable_blend_mode_ann"),
                                        description="add blend-mode annotations to SEED commands")
    blend_mode_default: Literal["CONVEX", "RESIDUAL", "CHANNEL", "CONFIDENCE"] = Field(
        "CONVEX", validation_alias=_t("blend_mode_default"), description="blend mode to annotate")
    blend_conf_gate_k: float = Field(1.0, validation_alias=_t("blend_conf_gate_k"), description="CONFIDENCE gate k")
    blend_conf_gate_tau: float = Field(1.0, validation_alias=_t("blend_conf_gate_tau"),
                                       description="CONFIDENCE gate tau")
    blend_alpha_lo: float = Field(0.0, validation_alias=_t("blend_alpha_lo"), description="CONFIDENCE alpha floor")
    blend_alpha_hi: float = Field(1.0, validation_alias=_t("blend_alpha_hi"), description="CONFIDENCE alpha cap")
    blend_alpha_vec_max: int = Field(64, validation_alias=_t("blend_alpha_vec_max"),
                                     description="CHANNEL alpha_vec only up to this many channels")

    field_report_retention_hours: float = Field(24.0, validation_alias=_t("field_report_retention_hours"),
                                                description="published/dropped reports kept this long")
    field_report_max_retries: int = Field(3, validation_alias=_t("field_report_max_retries"),
                                          description="publish attempts before a report is dropped (counted)")
    fr_obs_window_epochs: int = Field(1, validation_alias=_t("fr_obs_window_epochs"),
                                      description="epochs a SEED command is observed before its synthetic report")
    fr_retry_backoff_ms: float = Field(1000.0, validation_alias=_t("fr_retry_backoff_ms"),
                                       description="first retry delay of a failed publish")
    fr_retry_backoff_mult: float = Field(2.0, validation_alias=_t("fr_retry_backoff_mult"),
                                         description="retry delay multiplier")

    # Fault injection for drills: refused unless ESPER_ENABLE_FAULT_INJECTION=1.
    enable_fault_injection: bool = Field(False, description="allow the TAMIYO_FAULT_* knobs (drills only)")
    fault_inference_delay_ms: float = Field(0.0, validation_alias=_t("fault_inference_delay_ms"),
                                            description="sleep this long inside inference (drills)")
    fault_crash_after: int = Field(0, validation_alias=_t("fault_crash_after"),
                                   description="os._exit after this many decisions (drills); 0 = never")

    @model_validator(mode="after")
    def _faults_need_opt_in(self) -> TamiyoSettings:
        if (self.fault_inference_delay_ms or self.fault_crash_after) and not self.enable_fault_injection:
            raise ConfigurationError(
                "TAMIYO_FAULT_* knobs are set but ESPER_ENABLE_FAULT_INJECTION is not 1: refusing to start"
            )
        return self
