"""Simic's one typed settings object: bus settings (`ESPER_*`) plus `SIMIC_*` knobs."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from esper.oona.settings import OonaSettings


def _s(name: str) -> AliasChoices:
    return AliasChoices(f"SIMIC_{name.upper()}")


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

    # -- offline training (REFERENCE §11: PPO lr 5e-4, gamma 0.99, lambda 0.95) ------------------------------
    learning_rate: float = Field(5e-4, gt=0, validation_alias=_s("learning_rate"),
                                 description="Adam learning rate (the prototype's PPO lr)")
    gamma: float = Field(0.99, gt=0, le=1, validation_alias=_s("gamma"), description="reward discount")
    gae_lambda: float = Field(0.95, ge=0, le=1, validation_alias=_s("gae_lambda"), description="GAE lambda")
    outcome_reward: float = Field(0.1, ge=0, validation_alias=_s("outcome_reward"),
                                  description="reward ± for a SUCCESS / REGRESSION outcome")
    fate_reward: float = Field(1.0, ge=0, validation_alias=_s("fate_reward"),
                               description="reward ± for a GERMINATE whose seed is later FOSSILIZED / CULLED")
    fate_min_improvement: float = Field(0.03, validation_alias=_s("fate_min_improvement"),
                                        description="mean ablation evidence (validation loss) a FOSSILIZED seed "
                                                    "needs to count as a benefit; less counts as a cull")
    fate_steps: int = Field(40, ge=0, validation_alias=_s("fate_steps"),
                            description="full-batch steps fitting the pair scores to every germination's fate, "
                                        "before imitation and again (the pair layers alone) after AWR; 0 = off "
                                        "(the default before session 13: docs/simic.md)")
    imitation_epochs: int = Field(2, ge=0, validation_alias=_s("imitation_epochs"),
                                  description="passes of imitation of positive-advantage decisions")
    awr_epochs: int = Field(4, ge=0, validation_alias=_s("awr_epochs"),
                            description="passes of advantage-weighted regression after imitation")
    batch_size: int = Field(64, ge=1, validation_alias=_s("batch_size"), description="graphs per step")
    awr_beta: float = Field(1.0, gt=0, validation_alias=_s("awr_beta"),
                            description="AWR temperature, in standard deviations of the advantage")
    awr_max_weight: float = Field(20.0, gt=1, validation_alias=_s("awr_max_weight"),
                                  description="cap of one decision's AWR weight")
    value_weight: float = Field(0.5, ge=0, validation_alias=_s("value_weight"),
                                description="weight of the value head's MSE on the return")
    balance_actions: bool = Field(True, validation_alias=_s("balance_actions"),
                                  description="each action carries an equal share of the action loss (rare "
                                              "germinations are not drowned by pauses)")
    max_balance: float = Field(50.0, ge=1, validation_alias=_s("max_balance"),
                               description="cap of one action's balancing factor")
    train_seed: int = Field(0, validation_alias=_s("train_seed"), description="seeds shuffling and dropout")
    holdout_fraction: float = Field(0.25, gt=0, lt=1, validation_alias=_s("holdout_fraction"),
                                    description="share of training runs held out for the validation gate")
    gate_margin: float = Field(0.01, ge=0, validation_alias=_s("gate_margin"),
                               description="a candidate must beat the current policy's score by more than this")
    gate_min_holdout: int = Field(20, ge=1, validation_alias=_s("gate_min_holdout"),
                                  description="fewer held-out decisions than this: the gate refuses")
    policy_dir: Path = Field(Path("./var/simic/policies"), validation_alias=_s("policy_dir"),
                             description="trained checkpoints are written here")
    tamiyo_var_dir: Path | None = Field(None, validation_alias=_s("tamiyo_var_dir"),
                                        description="Tamiyo's var dir: train with its registries and norms "
                                                    "(unset: fresh ones, which index keys the same way)")
    max_blueprints: int = Field(8, ge=1, le=64, validation_alias=_s("max_blueprints"),
                                description="candidate blueprints per rebuilt graph: Tamiyo's "
                                            "TAMIYO_MAX_BLUEPRINTS, so each graph is the one it decided on")
    catalog_timeout_ms: float = Field(2000.0, gt=0, validation_alias=_s("catalog_timeout_ms"),
                                      description="budget of the blueprint catalogue request to Urza")

    # -- the service's own rounds (rounds.py) -------------------------------------------------------------
    train_interval_s: float = Field(3600.0, ge=0, validation_alias=_s("train_interval_s"),
                                    description="seconds between checks for a training round (0: no rounds; "
                                                "`train` runs one by hand)")
    train_min_new_reports: int = Field(500, ge=1, validation_alias=_s("train_min_new_reports"),
                                       description="a round needs at least this many reports since the last one")
    train_max_reports: int = Field(1_000_000, ge=1, validation_alias=_s("train_max_reports"),
                                   description="most reports one round reads (oldest first)")
    auto_publish: bool = Field(True, validation_alias=_s("auto_publish"),
                               description="publish a candidate the gate accepts as a PolicyUpdate on `policy`")
