"""The BSDS (blueprint safety data sheet): a crucible report turned into risk, band and handling.

Risk starts from the descriptor's own prior times a tier prior; every measured hazard then lifts it to
at least its severity floor (a module that produces NaNs, blows up or kills gradients, or leaks is
CRITICAL; one that oscillates, loses precision or stalls is at least HIGH), and each further hazard
adds a little. Bands follow the prototype: CRITICAL >= 0.85, HIGH >= 0.60, MEDIUM >= 0.30, else LOW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

from google.protobuf.timestamp_pb2 import Timestamp

from esper.leyline import pb
from esper.urabrask.crucible import CrucibleReport
from esper.urabrask.probes import (
    HAZARD_EXCEPTION,
    HAZARD_GRADIENT_EXPLODE,
    HAZARD_GRADIENT_VANISH,
    HAZARD_LATENCY,
    HAZARD_MEMORY_GROWTH,
    HAZARD_NAN,
    HAZARD_OSCILLATION,
    HAZARD_PRECISION,
)

BSDS_VERSION = 1

BAND_CRITICAL = 0.85
BAND_HIGH = 0.60
BAND_MEDIUM = 0.30

#: The least risk a measured hazard implies: severe ones land in CRITICAL, the others in HIGH.
HAZARD_FLOORS: Mapping[str, float] = MappingProxyType({
    HAZARD_EXCEPTION: 0.90,
    HAZARD_NAN: 0.90,
    HAZARD_GRADIENT_EXPLODE: 0.90,
    HAZARD_GRADIENT_VANISH: 0.90,
    HAZARD_MEMORY_GROWTH: 0.90,
    HAZARD_OSCILLATION: 0.65,
    HAZARD_PRECISION: 0.65,
    HAZARD_LATENCY: 0.65,
})
#: Risk added for each hazard beyond the most severe one.
EXTRA_HAZARD_RISK = 0.02

#: Multiplier on the descriptor's risk prior by tier (unknown tiers are treated as EXPERIMENTAL).
TIER_PRIORS: Mapping[int, float] = MappingProxyType({
    pb.BLUEPRINT_TIER_SAFE: 1.0,
    pb.BLUEPRINT_TIER_EXPERIMENTAL: 1.5,
    pb.BLUEPRINT_TIER_HIGH_RISK: 2.0,
})
_DEFAULT_TIER_PRIOR = 1.5


def prior_risk(descriptor: pb.BlueprintDescriptor) -> float:
    """The descriptor's risk (clamped to [0, 1]; NaN counts as 1) times its tier prior, clamped."""
    risk = descriptor.risk if math.isfinite(descriptor.risk) else 1.0
    return _clamp(_clamp(risk) * TIER_PRIORS.get(descriptor.tier, _DEFAULT_TIER_PRIOR))


def risk_score(descriptor: pb.BlueprintDescriptor, hazards: tuple[str, ...]) -> float:
    """Prior risk, raised to the highest floor among `hazards`, plus a step per extra hazard.
    An unknown hazard name counts as severe."""
    risk = prior_risk(descriptor)
    if hazards:
        floor = max(HAZARD_FLOORS.get(h, max(HAZARD_FLOORS.values())) for h in hazards)
        risk = max(risk, floor) + EXTRA_HAZARD_RISK * (len(hazards) - 1)
    return _clamp(risk)


def hazard_band(risk: float) -> pb.HazardBand.ValueType:
    if risk >= BAND_CRITICAL:
        return pb.HAZARD_BAND_CRITICAL
    if risk >= BAND_HIGH:
        return pb.HAZARD_BAND_HIGH
    if risk >= BAND_MEDIUM:
        return pb.HAZARD_BAND_MEDIUM
    return pb.HAZARD_BAND_LOW


def handling_class(band: pb.HazardBand.ValueType, descriptor: pb.BlueprintDescriptor) -> pb.HandlingClass.ValueType:
    """QUARANTINE for CRITICAL or a quarantine-only (HIGH_RISK) blueprint, RESTRICTED for HIGH, else STANDARD."""
    if band == pb.HAZARD_BAND_CRITICAL or descriptor.quarantine_only or descriptor.tier == pb.BLUEPRINT_TIER_HIGH_RISK:
        return pb.HANDLING_CLASS_QUARANTINE
    if band == pb.HAZARD_BAND_HIGH:
        return pb.HANDLING_CLASS_RESTRICTED
    return pb.HANDLING_CLASS_STANDARD


def resource_profile(report: CrucibleReport) -> pb.ResourceProfile.ValueType:
    """MEMORY_HEAVY for a leak or large parameters, else GPU when probed on CUDA, else CPU."""
    if HAZARD_MEMORY_GROWTH in report.hazards or report.param_bytes >= report.thresholds.heavy_param_bytes:
        return pb.RESOURCE_PROFILE_MEMORY_HEAVY
    return pb.RESOURCE_PROFILE_GPU if report.on_gpu else pb.RESOURCE_PROFILE_CPU


def recommendation(report: CrucibleReport, band: pb.HazardBand.ValueType,
                   handling: pb.HandlingClass.ValueType) -> str:
    head = (f"{pb.HazardBand.Name(band).removeprefix('HAZARD_BAND_')} / "
            f"{pb.HandlingClass.Name(handling).removeprefix('HANDLING_CLASS_')} "
            f"(slot {report.slot}, {report.device}): ")
    if not report.hazards:
        return head + (f"no hazards measured; latency p50 {report.latency_p50_ms:.3g} ms, "
                       f"p95 {report.latency_p95_ms:.3g} ms")
    return head + "measured hazards " + ", ".join(report.hazards) + " — " + "; ".join(report.findings)


def issue_bsds(descriptor: pb.BlueprintDescriptor, report: CrucibleReport, *,
               now: datetime | None = None) -> pb.BSDS:
    """The safety sheet for `descriptor` from what the crucible measured (pure: `now` defaults to UTC now)."""
    risk = risk_score(descriptor, report.hazards)
    band = hazard_band(risk)
    handling = handling_class(band, descriptor)
    issued_at = Timestamp()
    issued_at.FromDatetime(now if now is not None else datetime.now(UTC))
    return pb.BSDS(
        version=BSDS_VERSION,
        blueprint_id=descriptor.blueprint_id,
        risk_score=risk,
        hazard_band=band,
        handling_class=handling,
        resource_profile=resource_profile(report),
        recommendation=recommendation(report, band, handling),
        issued_at=issued_at,
        provenance=pb.PROVENANCE_URABRASK,
    )


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))
