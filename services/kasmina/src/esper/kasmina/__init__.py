"""Kasmina: executes seeds inside the trainer (lifecycle, gates, kernels, blending, gradient isolation).

The trainer needs three names: :class:`SeedSlot` (put one after a host layer), :class:`Kasmina` (the
executor: commands, per-step ``advance``, telemetry, ``SeedState`` export) and :class:`KernelClient`
(kernels from Urza over Oona). See docs/kasmina.md.
"""

from esper.kasmina.blending import (
    BLEND_MODES,
    SCHEDULE_KINDS,
    AlphaSchedule,
    BlendMode,
    BlendSpec,
    ScheduleKind,
    apply_blend,
    blend_channel,
    blend_confidence,
    blend_convex,
    blend_residual,
    confidence_gate,
    confidence_gate_value,
)
from esper.kasmina.errors import CommandRejected, IllegalTransitionError, KasminaError, KernelFetchError
from esper.kasmina.gates import (
    GateResult,
    GradientObservation,
    InterfaceProbe,
    gate_g0_sanity,
    gate_g1_gradient_health,
    gate_g2_stability,
    gate_g3_interface,
    gate_g4_system_impact,
    gate_g5_reset,
    gate_name,
)
from esper.kasmina.isolation import IsolationMonitor, IsolationStats
from esper.kasmina.kasmina import CommandAction, CommandOutcome, Kasmina, allowed_blend_modes
from esper.kasmina.kernels import FetchedKernel, KernelClient, KernelSource, KernelStats
from esper.kasmina.lifecycle import TRANSITIONS, SeedLifecycle, Transition, is_legal, stage_name
from esper.kasmina.optim import add_seed_params, remove_seed_params
from esper.kasmina.settings import KasminaSettings
from esper.kasmina.slot import SeedSlot, SlotMode, seed_id_for
from esper.kasmina.validation import ANNOTATION_REASONS, SECURITY_REASONS, CommandValidator, parse_germination

__all__ = [
    "ANNOTATION_REASONS",
    "BLEND_MODES",
    "SCHEDULE_KINDS",
    "SECURITY_REASONS",
    "TRANSITIONS",
    "AlphaSchedule",
    "BlendMode",
    "BlendSpec",
    "CommandAction",
    "CommandOutcome",
    "CommandRejected",
    "CommandValidator",
    "FetchedKernel",
    "GateResult",
    "GradientObservation",
    "IllegalTransitionError",
    "InterfaceProbe",
    "IsolationMonitor",
    "IsolationStats",
    "Kasmina",
    "KasminaError",
    "KasminaSettings",
    "KernelClient",
    "KernelFetchError",
    "KernelSource",
    "KernelStats",
    "ScheduleKind",
    "SeedLifecycle",
    "SeedSlot",
    "SlotMode",
    "Transition",
    "add_seed_params",
    "allowed_blend_modes",
    "apply_blend",
    "blend_channel",
    "blend_confidence",
    "blend_convex",
    "blend_residual",
    "confidence_gate",
    "confidence_gate_value",
    "gate_g0_sanity",
    "gate_g1_gradient_health",
    "gate_g2_stability",
    "gate_g3_interface",
    "gate_g4_system_impact",
    "gate_g5_reset",
    "gate_name",
    "is_legal",
    "parse_germination",
    "remove_seed_params",
    "seed_id_for",
    "stage_name",
]
