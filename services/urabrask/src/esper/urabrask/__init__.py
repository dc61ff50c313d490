"""Urabrask: Esper's crucible.

Urabrask runs real probes on a compiled blueprint module — non-finite values, exploding or vanishing
gradients, float32-vs-float64 precision, determinism of identical calls, retained-memory growth and
latency against a reference layer measured in the same run — and turns what it measured into a BSDS
safety sheet (risk score, hazard band, handling class, resource profile). Verdicts come from
measurement only, never from a blueprint's name, id, class or tier; the tier enters only the risk prior.

This package is the pure part (no IO): `run_crucible` and `issue_bsds`.
"""

from esper.urabrask.bsds import (
    BAND_CRITICAL,
    BAND_HIGH,
    BAND_MEDIUM,
    BSDS_VERSION,
    EXTRA_HAZARD_RISK,
    HAZARD_FLOORS,
    TIER_PRIORS,
    handling_class,
    hazard_band,
    issue_bsds,
    prior_risk,
    recommendation,
    resource_profile,
    risk_score,
)
from esper.urabrask.crucible import CrucibleReport, run_crucible
from esper.urabrask.measure import ModuleSource, reachable_tensor_bytes, reference_module
from esper.urabrask.optrace import OpTrace, trace_forward
from esper.urabrask.probes import (
    HAZARD_EXCEPTION,
    HAZARD_GRADIENT_EXPLODE,
    HAZARD_GRADIENT_VANISH,
    HAZARD_LATENCY,
    HAZARD_MEMORY_GROWTH,
    HAZARD_NAN,
    HAZARD_OSCILLATION,
    HAZARD_PRECISION,
    HAZARDS,
    DeterminismResult,
    GradientResult,
    LatencyResult,
    MemoryResult,
    NanResult,
    PrecisionResult,
    ProbeResult,
    probe_determinism,
    probe_gradient,
    probe_latency,
    probe_memory,
    probe_nan,
    probe_precision,
)
from esper.urabrask.thresholds import DEFAULT_THRESHOLDS, Thresholds

__all__ = [
    "BAND_CRITICAL",
    "BAND_HIGH",
    "BAND_MEDIUM",
    "BSDS_VERSION",
    "DEFAULT_THRESHOLDS",
    "EXTRA_HAZARD_RISK",
    "HAZARDS",
    "HAZARD_EXCEPTION",
    "HAZARD_FLOORS",
    "HAZARD_GRADIENT_EXPLODE",
    "HAZARD_GRADIENT_VANISH",
    "HAZARD_LATENCY",
    "HAZARD_MEMORY_GROWTH",
    "HAZARD_NAN",
    "HAZARD_OSCILLATION",
    "HAZARD_PRECISION",
    "TIER_PRIORS",
    "CrucibleReport",
    "DeterminismResult",
    "GradientResult",
    "LatencyResult",
    "MemoryResult",
    "ModuleSource",
    "NanResult",
    "OpTrace",
    "PrecisionResult",
    "ProbeResult",
    "Thresholds",
    "handling_class",
    "hazard_band",
    "issue_bsds",
    "prior_risk",
    "probe_determinism",
    "probe_gradient",
    "probe_latency",
    "probe_memory",
    "probe_nan",
    "probe_precision",
    "reachable_tensor_bytes",
    "recommendation",
    "reference_module",
    "resource_profile",
    "risk_score",
    "run_crucible",
    "trace_forward",
]
