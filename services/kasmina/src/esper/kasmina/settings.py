"""Kasmina's knobs (``KASMINA_*`` environment variables). Kasmina runs inside the trainer, so it has
no bus settings of its own: the trainer hands it its Oona client and signing keys."""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esper.core.errors import ConfigurationError

__all__ = ["KasminaSettings"]


def _k(name: str) -> AliasChoices:
    return AliasChoices(f"KASMINA_{name.upper()}")


class KasminaSettings(BaseSettings):
    # The prefix matters even though every field has an alias: with populate_by_name, pydantic-settings
    # also reads `<prefix><field name>`, and an empty prefix would let a bare `MAX_AGE_S` leak in.
    model_config = SettingsConfigDict(env_prefix="KASMINA_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True)

    # -- command validation (prototype: nonce TTL 300 s, 5 s ahead, 60 s old) -------------------------
    nonce_ttl_s: float = Field(300.0, gt=0, validation_alias=_k("nonce_ttl_s"), description="command ids remembered")
    nonce_capacity: int = Field(16_384, ge=1024, validation_alias=_k("nonce_capacity"),
                                description="command ids remembered at most (should exceed commands per max_age_s; "
                                            "past it, commands issued before a dropped id are refused as stale)")
    max_future_s: float = Field(5.0, ge=0, validation_alias=_k("max_future_s"),
                                description="commands issued further ahead are rejected (issued_in_future)")
    max_age_s: float = Field(60.0, gt=0, validation_alias=_k("max_age_s"),
                             description="commands older than this are rejected (stale_command)")

    # -- kernels --------------------------------------------------------------------------------------
    # The artifact directory and the kernel request deadline are the trainer's (URZA_ARTIFACT_DIR,
    # TOLARIA_KERNEL_TIMEOUT_MS): it is the process that reads the files and owns the bus client.
    kernel_cache_size: int = Field(32, ge=1, validation_alias=_k("kernel_cache_size"),
                                   description="verified artifacts kept in the LRU cache")
    breaker_failures: int = Field(3, ge=1, validation_alias=_k("breaker_failures"),
                                  description="kernel-fetch failures that open Kasmina's breaker")
    breaker_successes: int = Field(2, ge=1, validation_alias=_k("breaker_successes"),
                                   description="half-open successes that close it again")
    breaker_reset_s: float = Field(60.0, ge=0, validation_alias=_k("breaker_reset_s"),
                                   description="seconds the open breaker fails fetches fast before a probe")

    # -- lifecycle windows (training steps in which the seed ran) --------------------------------------
    probe_steps: int = Field(1, ge=1, validation_alias=_k("probe_steps"), description="GERMINATED steps before G1")
    training_steps: int = Field(20, ge=1, validation_alias=_k("training_steps"), description="TRAINING window (G2)")
    blend_steps: int = Field(20, ge=1, validation_alias=_k("blend_steps"), description="alpha schedule length")
    shadow_steps: int = Field(10, ge=1, validation_alias=_k("shadow_steps"), description="SHADOWING window (G4)")
    probation_steps: int = Field(20, ge=1, validation_alias=_k("probation_steps"),
                                 description="PROBATIONARY window before the fossilise/cull verdict")
    embargo_steps: int = Field(30, ge=0, validation_alias=_k("embargo_steps"), description="cooldown after a cull")
    evidence_grace_steps: int = Field(100, ge=0, validation_alias=_k("evidence_grace_steps"),
                                      description="steps past probation to wait for evidence before culling")
    min_evidence: int = Field(1, ge=1, validation_alias=_k("min_evidence"),
                              description="with/without-seed validation reports needed for a verdict")
    min_improvement: float = Field(0.0, validation_alias=_k("min_improvement"),
                                   description="fossilise only if mean(loss_without - loss_with) exceeds this")

    # -- gate thresholds --------------------------------------------------------------------------------
    isolation_threshold: float = Field(1e-6, gt=0, validation_alias=_k("isolation_threshold"),
                                       description="|host·seed gradient dot| allowed (G1)")
    max_grad_norm: float = Field(1e3, gt=0, validation_alias=_k("max_grad_norm"), description="G1 explosion bound")
    stability_loss_ratio: float = Field(2.0, gt=0, validation_alias=_k("stability_loss_ratio"),
                                        description="G2: late/early mean local loss allowed")
    latency_budget_ms: float = Field(50.0, gt=0, validation_alias=_k("latency_budget_ms"),
                                     description="G2: p95 seed forward latency (prototype hook budget)")
    regression_tolerance: float = Field(0.1, ge=0, validation_alias=_k("regression_tolerance"),
                                        description="G4: blended loss may exceed the host baseline by this fraction")
    seed_lr: float | None = Field(None, gt=0, validation_alias=_k("seed_lr"),
                                  description="learning rate of seed parameter groups (default: the host's)")

    @model_validator(mode="after")
    def _check(self) -> KasminaSettings:
        if self.nonce_ttl_s < self.max_age_s:
            raise ConfigurationError("nonce_ttl_s must be at least max_age_s, or a fresh command could be replayed")
        return self
