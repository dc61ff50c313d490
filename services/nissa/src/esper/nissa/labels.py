"""Bounded Prometheus label values.

Every label value Nissa exports comes from a closed vocabulary: a Leyline enum name, or a name in one
of the sets below (what the fleet's services actually emit). Anything else becomes ``other``, so a
buggy or hostile sender cannot blow up the series count of the metrics it feeds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from google.protobuf.descriptor import EnumDescriptor

OTHER: Final = "other"
UNKNOWN: Final = "unknown"

SOURCES: Final[frozenset[str]] = frozenset({
    "tolaria", "kasmina", "tamiyo", "oona", "simic", "urza", "karn", "tezzeret", "urabrask", "weatherlight",
    "nissa",
})
"""``TelemetryPacket.source_subsystem`` values of the fleet (ARCHITECTURE §1)."""

EVENTS: Final[frozenset[str]] = frozenset({
    # Tolaria (trainer.py, emergency.py)
    "epoch_budget_exceeded", "hook_budget", "tamiyo_timeout", "command_stale", "optimizer_adjusted", "loss_spike",
    "step_failure", "rollback", "tolaria.emergency.escalated", "tolaria.emergency.halt", "tolaria.emergency.dropped",
    "conservative_mode_cleared", "kernel_wait_timeout", "command_unsupported", "checkpoint_refused", "rollback_failed",
    # (conservative_mode_entered: listed with Tamiyo's; command_rejected: with Kasmina's)
    # Kasmina (kasmina.py; published inside Tolaria's epoch packet)
    "command_rejected", "emergency_cleanup", "fallback_status_rejected", "gate_event", "gate_failure",
    "germination_failed", "isolation_violation", "kernel_attached", "mesh_coverage_missing", "optimizer_unbound",
    "rollback_ready", "seed_culled", "seed_fossilized", "seed_operation", "seed_paused", "seed_resumed",
    "seed_stage", "seed_verdict", "breaker_event",
    # Tamiyo: decision failures, metadata, policy updates, conservative mode ...
    "timeout_inference", "timeout_urza", "degraded_inputs", "metadata_unavailable", "dependency_violation",
    "inference_breaker_open", "inference_error", "policy_update_applied", "policy_update_rejected",
    "registry_mismatch", "policy_load_failed", "conservative_mode_entered", "conservative_mode_exited",
    # ... and the risk engine's finding codes (risk.py).
    "policy_risk_critical", "policy_risk_elevated", "pause_triggered", "bp_quarantine", "blueprint_risk",
    "bsds_handling_quarantine", "bsds_hazard_critical", "bsds_hazard_high", "loss_warning", "step_latency_high",
    "kasmina_apply_slow", "kasmina_finalize_slow", "isolation_violations", "loss_volatility_high",
    "grad_variance_high", "grad_conflict_high", "device_pressure_high", "cpu_pressure_high", "germinate_too_late",
    # Oona (client.py); `oona.breaker_open` is on core's HIGH list though nothing emits it yet.
    "oona.dead_letter", "oona.dead_letter.bad_signature", "oona.breaker_open",
    # Simic, Urza, Tezzeret.
    "field_report_rejected", "kernel_artifact_error", "bsds_rejected", "compile_failed",
    # Weatherlight (supervisor restarts).
    "service_restarted",
    # Nissa's own alert transitions.
    "nissa.alert_fired", "nissa.alert_cleared",
})
"""Event names (``attributes["event"]``) kept as label values; the rest count as ``other``."""


def enum_label(enum: EnumDescriptor, value: int, prefix: str) -> str:
    """``SEED_STAGE_TRAINING`` → ``training``; a number the enum does not define → ``unknown``."""
    v = enum.values_by_number.get(value)
    return UNKNOWN if v is None else v.name.removeprefix(prefix).lower()


def enum_labels(enum: EnumDescriptor, prefix: str) -> tuple[str, ...]:
    """Every label of an enum except its 0 (UNSPECIFIED/UNKNOWN) value."""
    return tuple(v.name.removeprefix(prefix).lower() for v in enum.values if v.number)


def bounded(value: str, vocabulary: frozenset[str]) -> str:
    return value if value in vocabulary else OTHER


class BoundedKeys:
    """Admits at most ``capacity`` distinct keys at a time (oldest evicted first), for label values
    with no closed vocabulary (seed ids, breaker names). ``admit`` returns the evicted keys so the
    caller can remove their series."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def admit(self, key: str) -> list[str]:
        if key in self._keys:
            self._keys.move_to_end(key)
            return []
        self._keys[key] = None
        evicted = []
        while len(self._keys) > self.capacity:
            evicted.append(self._keys.popitem(last=False)[0])
        return evicted

    def discard(self, key: str) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

