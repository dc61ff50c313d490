"""Tolaria's one typed settings object: the bus settings (`ESPER_*`) plus the trainer's knobs.

Knobs keep the prototype's `TOLARIA_*` names (REFERENCE_PROTOTYPE §5); the decision budget reuses
Tamiyo's `TAMIYO_STEP_TIMEOUT_MS` so both sides of the hot path read one number. Every field also
accepts its own name in code (`TolariaSettings(epochs=3)`).

Deviation from the prototype: rollback and emergency broadcasting default to *on* (the prototype had
both off): ARCHITECTURE §6 makes them part of the failure semantics, and the drills rely on them.

An empty variable means unset (`TOLARIA_PROFILER_DIR=` in a compose file is not the current directory).
Tolaria owns the `TOLARIA_` namespace, so a `TOLARIA_*` name no field reads (a typo such as
`TOLARIA_EPOCH`), in the environment or `.env`, and two aliases of one field with different values
in the same one are a `ConfigurationError` (the environment overrides `.env`, alias or not); the
shared `ESPER_*` base keeps ignoring unknown names (other processes).
"""

from __future__ import annotations

import difflib
import os
import secrets
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from esper.core.errors import ConfigurationError
from esper.leyline import command_channel
from esper.oona.settings import OonaSettings
from esper.tolaria.heap import MAX_KEEP_MB

__all__ = ["OPTIMIZER_FAMILY_INDEX", "DecisionMode", "LrPolicy", "OptimizerName", "TolariaSettings",
           "default_run_id"]

_PREFIX = "TOLARIA_"

OptimizerName = Literal["sgd", "adam", "adamw"]
LrPolicy = Literal["off", "constant", "cosine", "step"]
DecisionMode = Literal["pipelined", "sync"]

OPTIMIZER_FAMILY_INDEX: dict[OptimizerName, int] = {"sgd": 0, "adam": 1, "adamw": 2}
"""`training_metrics["optimizer_family_index"]` (prototype: sgd 0, adam 1, adamw 2)."""


def _t(name: str) -> AliasChoices:
    """Accept the prototype's TOLARIA_<NAME> env var (and the field name in code)."""
    return AliasChoices(f"TOLARIA_{name.upper()}")


def default_run_id() -> str:
    return f"run-{secrets.token_hex(4)}"


def _env_names(field: FieldInfo) -> tuple[str, ...]:
    alias = field.validation_alias
    if isinstance(alias, str):
        return (alias.upper(),)
    if isinstance(alias, AliasChoices):
        return tuple(str(a).upper() for a in alias.choices)
    return ()


class _TolariaNamesCheck(PydanticBaseSettingsSource):
    """Contributes no values: refuses unknown `TOLARIA_*` names and conflicting aliases before validation.

    pydantic-settings drops a name no field reads and takes the first alias it finds, so a typo or a
    stale second alias would otherwise change nothing, silently.
    """

    def __init__(self, settings_cls: type[BaseSettings], *sources: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._sources = sources

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        given_in: list[tuple[str, dict[str, str]]] = [  # (where, NAME -> value) per source
            (".env" if isinstance(source, DotEnvSettingsSource) else "the environment",
             {k.upper(): str(v) for k, v in source.env_vars.items() if v is not None})
            for source in self._sources if isinstance(source, EnvSettingsSource)]
        seen: dict[str, str] = {}  # NAME -> where; the environment wins over .env
        for where, values in reversed(given_in):
            seen.update(dict.fromkeys(values, where))
        fields = [_env_names(f) for f in self.settings_cls.model_fields.values()]
        known = {name for names in fields for name in names}
        unknown = sorted(k for k in seen if k.startswith(_PREFIX) and k not in known)
        if unknown:
            def hint(name: str) -> str:  # compared without the shared prefix, which would make all names close
                near = difflib.get_close_matches(name.removeprefix(_PREFIX), [k.removeprefix(_PREFIX) for k in known],
                                                  n=1)
                return f"{name} ({seen[name]}{f'; did you mean {_PREFIX}{near[0]}?' if near else ''})"

            raise ConfigurationError(f"unknown Tolaria setting {', '.join(map(hint, unknown))}: no TOLARIA_* knob "
                                     f"has this name (docs/tolaria.md, Settings)")
        # Within one source only: across sources the environment overrides .env, alias or not, as it
        # does for one name (an experiment's TOLARIA_LR over a .env's TOLARIA_LEARNING_RATE).
        for where, values in given_in:
            for names in fields:
                given = {n: values[n] for n in names if n in values}
                if len(set(given.values())) > 1:
                    raise ConfigurationError(f"conflicting aliases of one setting in {where}: " + ", ".join(
                        f"{n}={v!r}" for n, v in given.items()) + "; set only one")
        return {}


class TolariaSettings(OonaSettings):
    model_config = SettingsConfigDict(env_prefix="ESPER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", populate_by_name=True, env_ignore_empty=True)

    service_name: str = Field("tolaria", description="process name in logs, metrics, heartbeats and envelopes")

    # -- run and data ------------------------------------------------------------------------------
    run_id: str = Field(default_factory=default_run_id, validation_alias=_t("run_id"),
                        description="training run id: names the `command.<run>` reply channel; random if unset")
    dataset_path: Path | None = Field(None, validation_alias=_t("dataset_path"),
                                      description=".npz with x, y (optional x_val, y_val); unset = sklearn digits")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, validation_alias=_t("val_fraction"),
                                description="stratified validation share when the data brings no x_val")
    seed: int = Field(0, ge=0, le=2**32 - 1, validation_alias=_t("seed"),  # numpy/sklearn's random_state range
                      description="seeds the split, the host's initial weights and the batch order")
    hidden_width: int = Field(32, ge=1, le=4096, validation_alias=_t("hidden_width"),
                              description="width of the host's hidden layers (small, so growth can help)")
    hidden_layers: int = Field(2, ge=1, le=16, validation_alias=_t("hidden_layers"),
                               description="hidden layers of the host, each followed by a seed slot")
    input_slot: bool = Field(False, validation_alias=_t("input_slot"),
                             description="a seed slot on the flattened input too (slot `input`, as wide as the "
                                         "features); the bottleneck host (width 4, 1 layer, input slot) is where "
                                         "growth pays on digits")

    # -- optimisation ------------------------------------------------------------------------------
    epochs: int = Field(20, ge=1, validation_alias=_t("epochs"), description="epochs to train")
    batch_size: int = Field(64, ge=1, validation_alias=_t("batch_size"), description="samples per step")
    learning_rate: float = Field(1e-3, gt=0.0, validation_alias=AliasChoices("TOLARIA_LR", "TOLARIA_LEARNING_RATE"),
                                 description="base learning rate (TOLARIA_LR or TOLARIA_LEARNING_RATE)")
    optimizer: OptimizerName = Field("adam", validation_alias=_t("optimizer"), description="sgd, adam or adamw")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, validation_alias=_t("momentum"), description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0, validation_alias=_t("weight_decay"), description="weight decay")
    lr_policy: LrPolicy = Field("off", validation_alias=_t("lr_policy"),
                                description="off (optimizer's LR untouched), constant, cosine, step")
    lr_warmup_steps: int = Field(0, ge=0, validation_alias=_t("lr_warmup_steps"),
                                 description="linear warm-up steps before the LR policy applies")
    lr_step_epochs: int = Field(10, ge=1, validation_alias=_t("lr_step_epochs"),
                                description="`step` policy: decay every this many epochs")
    lr_step_gamma: float = Field(0.5, gt=0.0, le=1.0, validation_alias=_t("lr_step_gamma"),
                                 description="`step` policy: LR multiplier per decay")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias=_t("device"),
                                                   description="auto picks CUDA when present")
    malloc_keep_mb: int = Field(1024, ge=0, le=MAX_KEEP_MB, validation_alias=_t("malloc_keep_mb"),
                                description="glibc: keep up to this much freed memory and serve large blocks from "
                                            "the heap, so a CPU step's gradients and optimizer temporaries do not "
                                            "page-fault every step (heap.py); 0 = glibc's defaults")

    # -- decisions (ARCHITECTURE §5) ---------------------------------------------------------------
    decision_mode: DecisionMode = Field("pipelined", validation_alias=_t("decision_mode"),
                                        description="pipelined: step k+1 starts at once, the reply is applied at "
                                                    "the next boundary; sync: wait up to the step timeout")
    decision_transport: Literal["thread", "process"] = Field(
        "process", validation_alias=_t("decision_transport"),
        description="thread: requests run on the trainer's bus thread; process: in a sidecar process, so their "
                    "Python work does not take the GIL from training (sidecar.py)")
    decision_sidecar_cores: list[int] | None = Field(
        None, validation_alias=_t("decision_sidecar_cores"),
        description="process transport: pin the sidecar to these cores (JSON list; unset: inherit)")
    tamiyo_step_timeout_ms: float = Field(5.0, gt=0.0, validation_alias="TAMIYO_STEP_TIMEOUT_MS",
                                          description="decision deadline per state packet (Tamiyo's env name)")
    kernel_wait_ms: float = Field(0.0, ge=0.0, le=60_000.0, validation_alias=_t("kernel_wait_ms"),
                                  description="after a germination, wait up to this long at the step boundary for "
                                              "its kernel from Urza, so it attaches at the next boundary whatever "
                                              "the timing (experiments); 0 = never wait")
    max_staleness_steps: int = Field(2, ge=0, validation_alias=_t("max_staleness_steps"),
                                     description="pipelined: a reply older than this many steps is discarded "
                                                 "(counted)")
    decision_breaker_failures: int = Field(3, ge=1, validation_alias=_t("decision_breaker_failures"),
                                           description="consecutive decision timeouts/errors that open the "
                                                       "decision breaker: conservative mode, Tamiyo is not asked "
                                                       "(prototype 3)")
    decision_breaker_reset_s: float = Field(5.0, ge=0.0, validation_alias=_t("decision_breaker_reset_s"),
                                            description="seconds in conservative mode before one step probes "
                                                        "Tamiyo again (prototype 30; 0 = probe every step)")
    epoch_budget_ms: float = Field(250.0, gt=0.0, validation_alias=_t("epoch_budget_ms"),
                                   description="an epoch whose training time is over this is counted with an "
                                               "epoch_budget_exceeded event; unlike the prototype (250 ms) not an "
                                               "epoch failure")
    hook_budget_ms: float = Field(50.0, gt=0.0, validation_alias=_t("hook_budget_ms"),
                                  description="a step whose boundary work is over this is counted with a HIGH "
                                              "hook_budget event; unlike the prototype (50 ms) not a failure")

    # -- rollback ----------------------------------------------------------------------------------
    rollback_enabled: bool = Field(True, validation_alias=_t("rollback_enabled"),
                                   description="roll back on epoch failures (prototype default: off)")
    rollback_fast_cap_mb: float = Field(32.0, gt=0.0, validation_alias=_t("rollback_fast_cap_mb"),
                                        description="byte cap of the in-memory snapshot ring, MiB")
    rollback_deadline_ms: float = Field(250.0, ge=0.0, validation_alias=_t("rollback_deadline_ms"),
                                        description="deadline of one rollback, both tiers together")
    rollback_snapshot_steps: int = Field(1, ge=1, validation_alias=_t("rollback_snapshot_steps"),
                                         description="take a fast snapshot every this many steps (at most "
                                                     "this often when TOLARIA_ROLLBACK_SNAPSHOT_OVERHEAD > 0)")
    rollback_snapshot_overhead: float = Field(
        0.01, ge=0.0, lt=1.0, validation_alias=_t("rollback_snapshot_overhead"),
        description="fraction of training time fast snapshots may cost: a due snapshot waits until the time "
                    "trained since the last one is its cost / this fraction (0: every SNAPSHOT_STEPS steps)")
    rollback_snapshot_max_steps: int = Field(
        50, ge=1, validation_alias=_t("rollback_snapshot_max_steps"),
        description="the overhead budget never defers a snapshot past this many steps since the last one "
                    "(a fast rollback loses at most this many steps)")
    rollback_snapshot_async: bool = Field(
        True, validation_alias=_t("rollback_snapshot_async"),
        description="copy a CPU snapshot on a worker thread beside the next step's forward and backward, "
                    "waited for before the update (copier.py); false: copied in line at the step's end")
    rollback_async_min_mb: float = Field(
        4.0, ge=0.0, validation_alias=_t("rollback_async_min_mb"),
        description="a state smaller than this (MiB) is copied in line even with the copier on: on a small "
                    "host handing the copy over costs the training thread more than the copy itself")
    rollback_copier_cores: list[int] | None = Field(
        None, validation_alias=_t("rollback_copier_cores"),
        description="pin the snapshot copier thread to these cores (JSON list; unset: the process's cores)")

    # -- checkpoints -------------------------------------------------------------------------------
    var_dir: Path = Field(Path("./var/tolaria"), validation_alias=_t("var_dir"),
                          description="checkpoints/ and emergency_spill.db live here")
    checkpoint_keep: int = Field(3, ge=1, validation_alias=_t("checkpoint_keep"),
                                 description="checkpoints retained (the pointer's history)")
    checkpoint_every_epochs: int = Field(1, ge=1, validation_alias=_t("checkpoint_every_epochs"),
                                         description="checkpoint at the end of every this many epochs")

    # -- emergencies -------------------------------------------------------------------------------
    emergency_enabled: bool = Field(True, validation_alias=_t("emergency_enabled"),
                                    description="broadcast EmergencySignals on `emergency` (prototype default: off)")
    emergency_bypass_max_per_min: int = Field(60, ge=1, validation_alias=_t("emergency_bypass_max_per_min"),
                                              description="broadcast cap; signals over it wait (in order)")
    emergency_l4_on_rollback_deadline: bool = Field(True, validation_alias=_t("emergency_l4_on_rollback_deadline"),
                                                    description="a missed rollback deadline escalates to HALT")
    emergency_l4_failed_epochs: int = Field(3, ge=1, validation_alias=_t("emergency_l4_failed_epochs"),
                                            description="consecutive failed epochs that escalate to HALT")
    emergency_queue_cap: int = Field(64, ge=1, validation_alias=_t("emergency_queue_cap"),
                                     description="signals held in memory while Redis is unreachable; more spill "
                                                 "to disk")
    emergency_spill_cap: int = Field(10_000, ge=1, validation_alias=_t("emergency_spill_cap"),
                                     description="signals kept on disk; past it the oldest are dropped (counted)")

    # -- kernels, step failures, faults ------------------------------------------------------------
    artifact_dir: Path = Field(Path("./var/urza/artifacts"), validation_alias="URZA_ARTIFACT_DIR",
                               description="Urza's artifact files (read-only here; shared volume)")
    kernel_timeout_ms: float = Field(2000.0, gt=0.0, validation_alias=_t("kernel_timeout_ms"),
                                     description="budget of one kernel prefetch from Urza (off the step path)")
    loss_spike_factor: float = Field(4.0, gt=1.0, validation_alias=_t("loss_spike_factor"),
                                     description="a step loss above this x the loss EWMA (after warm-up) is a spike")
    loss_spike_min_delta: float = Field(0.5, ge=0.0, validation_alias=_t("loss_spike_min_delta"),
                                        description="... and at least this much above it (nats): a noisy batch late in "
                                                    "training is not a spike")
    loss_spike_warmup_steps: int = Field(20, ge=0, validation_alias=_t("loss_spike_warmup_steps"),
                                         description="steps before spike detection starts")
    summary_json: Path | None = Field(None, validation_alias=_t("summary_json"),
                                      description="write the run summary here as JSON (flat keys)")
    enable_fault_injection: bool = Field(False, description="allow the TOLARIA_FAULT_* knobs (drills only)")
    fault_nan_at_step: int = Field(0, ge=0, validation_alias=_t("fault_nan_at_step"),
                                   description="make the loss NaN at this global step (drills); 0 = never")
    fault_corrupt_weights_at_step: int = Field(
        0, ge=0, validation_alias=_t("fault_corrupt_weights_at_step"),
        description="write NaN into a host weight right after this global step's update (drills: a step "
                    "that breaks the model; the next step fails and must be rolled back); 0 = never")
    fault_step_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0, validation_alias=_t("fault_step_delay_ms"),
                                       description="sleep this long in every training step (drills: steps as long "
                                                   "as a real model's); 0 = never")

    # -- profiler ----------------------------------------------------------------------------------
    profiler_dir: Path | None = Field(None, validation_alias=_t("profiler_dir"),
                                      description="torch.profiler traces go here; unset = profiler off. Must be "
                                                  "a writable directory (or creatable under one)")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The default sources, after a check of the `TOLARIA_*` names they hold (`_TolariaNamesCheck`)."""
        return (_TolariaNamesCheck(settings_cls, env_settings, dotenv_settings), init_settings, env_settings,
                dotenv_settings, file_secret_settings)

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, v: str) -> str:
        try:
            command_channel(v)
        except ValueError as e:
            raise ValueError(f"TOLARIA_RUN_ID: {e}") from e
        return v

    @field_validator("decision_sidecar_cores", "rollback_copier_cores")
    @classmethod
    def _valid_cores(cls, v: list[int] | None, info: Any) -> list[int] | None:
        """Core numbers this machine has. Not the process's own affinity: the bench pins the trainer to
        one core and its sidecar and copier to the others. Whether the OS lets a thread onto them is
        found out when the copier starts (the trainer's start-up) and when the sidecar starts."""
        cores = os.cpu_count() or 1
        if v is not None and (not v or any(not 0 <= c < cores for c in v)):
            raise ValueError(f"TOLARIA_{str(info.field_name).upper()}: {v} must be a non-empty list of core "
                             f"numbers of this machine, 0-{cores - 1}")
        return v

    @field_validator("dataset_path")
    @classmethod
    def _valid_dataset(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix != ".npz":
            raise ValueError(f"the dataset (--dataset or TOLARIA_DATASET_PATH) must be an .npz file, got {v}")
        return v

    @model_validator(mode="after")
    def _faults_need_opt_in(self) -> TolariaSettings:
        if ((self.fault_nan_at_step or self.fault_step_delay_ms or self.fault_corrupt_weights_at_step)
                and not self.enable_fault_injection):
            raise ConfigurationError("TOLARIA_FAULT_* knobs are set but ESPER_ENABLE_FAULT_INJECTION is not 1: "
                                     "refusing to start")
        return self

    @model_validator(mode="after")
    def _valid_output_paths(self) -> TolariaSettings:
        """Where the run writes at its end is checked at its start: an unusable summary path was found
        only after the whole run (a traceback, exit 1, no summary printed)."""
        if self.profiler_dir is not None:
            _check_creatable(self.profiler_dir, "TOLARIA_PROFILER_DIR", directory=True)
        if self.summary_json is not None:
            _check_creatable(self.summary_json, "TOLARIA_SUMMARY_JSON", directory=False)
        return self

    # -- derived -----------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.var_dir / "checkpoints"

    @property
    def emergency_spill_path(self) -> Path:
        return self.var_dir / "emergency_spill.db"

    @property
    def profiler_enabled(self) -> bool:
        return self.profiler_dir is not None

    @property
    def rollback_fast_cap_bytes(self) -> int:
        return int(self.rollback_fast_cap_mb * 1024 * 1024)

    @property
    def rollback_async_min_bytes(self) -> int:
        return int(self.rollback_async_min_mb * 1024 * 1024)

    @property
    def optimizer_family_index(self) -> int:
        return OPTIMIZER_FAMILY_INDEX[self.optimizer]

    def host_hidden(self) -> tuple[int, ...]:
        """The host's hidden widths: `hidden_layers` layers of `hidden_width`."""
        return (self.hidden_width,) * self.hidden_layers

    def torch_device(self) -> torch.device:
        """The device to train on; ConfigurationError when CUDA is asked for and absent."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError("TOLARIA_DEVICE=cuda but CUDA is not available")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _check_creatable(path: Path, name: str, *, directory: bool) -> None:
    """`path` is (or can be made) a writable directory, or a file the run can write atomically (a
    temporary file beside it, then a rename: its directory must be writable)."""
    if path.is_symlink() and not path.exists():
        raise ConfigurationError(f"{name} {path} is a dangling symlink")
    if path.exists():
        if path.is_dir() != directory:
            raise ConfigurationError(f"{name} {path} exists and is {'not ' if directory else ''}a directory")
        if not os.access(path if directory else path.parent, os.W_OK | os.X_OK):
            raise ConfigurationError(f"{name} {path} is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # mkdir(parents=True) would fail on it after the run
            raise ConfigurationError(f"{name} {path} cannot be created: {parent} is a dangling symlink")
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{name} {path} cannot be created: {parent} is not a writable directory")
