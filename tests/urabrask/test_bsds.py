"""BSDS issuance: table tests for risk, band boundaries, handling and resource profile."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.urabrask import (
    BAND_CRITICAL,
    BAND_HIGH,
    BAND_MEDIUM,
    HAZARDS,
    CrucibleReport,
    handling_class,
    hazard_band,
    issue_bsds,
    prior_risk,
    resource_profile,
    risk_score,
    run_crucible,
)
from tests.urabrask import modules as m

SAFE, EXPERIMENTAL, HIGH_RISK = pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL, pb.BLUEPRINT_TIER_HIGH_RISK
LOW, MEDIUM, HIGH, CRITICAL = pb.HAZARD_BAND_LOW, pb.HAZARD_BAND_MEDIUM, pb.HAZARD_BAND_HIGH, pb.HAZARD_BAND_CRITICAL
STANDARD, RESTRICTED = pb.HANDLING_CLASS_STANDARD, pb.HANDLING_CLASS_RESTRICTED
QUARANTINE = pb.HANDLING_CLASS_QUARANTINE
NOW = datetime(2025, 9, 1, 12, 0, 0, tzinfo=UTC)


def desc(risk: float = 0.1, tier: pb.BlueprintTier.ValueType = SAFE, *, quarantine_only: bool = False,
         blueprint_id: str = "BP999") -> pb.BlueprintDescriptor:
    return pb.BlueprintDescriptor(blueprint_id=blueprint_id, name="test", tier=tier, risk=risk,
                                  quarantine_only=quarantine_only)


@pytest.fixture(scope="module")
def clean() -> CrucibleReport:
    return run_crucible(m.Clean, SlotShape(m.C))


def with_hazards(report: CrucibleReport, *hazards: str) -> CrucibleReport:
    return dataclasses.replace(report, hazards=hazards)


@pytest.mark.parametrize(("risk", "band"), [
    (0.0, LOW), (0.2999, LOW), (BAND_MEDIUM, MEDIUM), (0.5999, MEDIUM), (BAND_HIGH, HIGH),
    (0.8499, HIGH), (BAND_CRITICAL, CRITICAL), (1.0, CRITICAL),
])
def test_band_boundaries(risk: float, band: int) -> None:
    assert hazard_band(risk) == band


@pytest.mark.parametrize(("risk", "band", "handling"), [
    (0.2999, LOW, STANDARD), (0.30, MEDIUM, STANDARD), (0.5999, MEDIUM, STANDARD), (0.60, HIGH, RESTRICTED),
    (0.8499, HIGH, RESTRICTED), (0.85, CRITICAL, QUARANTINE),
])
def test_clean_safe_report_boundaries(clean: CrucibleReport, risk: float, band: int, handling: int) -> None:
    """A clean SAFE report keeps the descriptor's risk (x1.0), so the bands land exactly on the prior."""
    sheet = issue_bsds(desc(risk), clean, now=NOW)
    assert (sheet.hazard_band, sheet.handling_class) == (band, handling)
    assert sheet.risk_score == pytest.approx(risk, abs=1e-6)


@pytest.mark.parametrize(("risk", "tier", "expected"), [
    (0.1, SAFE, 0.1), (0.4, EXPERIMENTAL, 0.6), (0.3, EXPERIMENTAL, 0.45), (0.45, HIGH_RISK, 0.9),
    (0.9, HIGH_RISK, 1.0), (1.7, SAFE, 1.0), (-0.5, SAFE, 0.0), (float("nan"), SAFE, 1.0),
    (0.2, pb.BLUEPRINT_TIER_UNSPECIFIED, 0.3),
])
def test_prior_risk(risk: float, tier: pb.BlueprintTier.ValueType, expected: float) -> None:
    assert prior_risk(desc(risk, tier)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("hazards", "minimum", "band"), [
    (("nan",), 0.9, CRITICAL), (("gradient_explode",), 0.9, CRITICAL), (("gradient_vanish",), 0.9, CRITICAL),
    (("memory_growth",), 0.9, CRITICAL), (("exception",), 0.9, CRITICAL),
    (("oscillation",), 0.65, HIGH), (("latency",), 0.65, HIGH), (("precision",), 0.65, HIGH),
    (("oscillation", "precision"), 0.67, HIGH), (("nan", "latency"), 0.92, CRITICAL),
    (("something_new",), 0.9, CRITICAL),  # an unknown hazard is treated as severe
])
def test_measured_hazards_raise_risk(hazards: tuple[str, ...], minimum: float, band: int) -> None:
    risk = risk_score(desc(0.05), hazards)
    assert risk >= minimum - 1e-9 and hazard_band(risk) == band


def test_every_hazard_reaches_at_least_high_and_risk_is_capped() -> None:
    for hazard in HAZARDS:
        assert hazard_band(risk_score(desc(0.0), (hazard,))) in (HIGH, CRITICAL)
    assert risk_score(desc(0.9, HIGH_RISK), HAZARDS) == 1.0


def test_clean_report_keeps_the_prior() -> None:
    assert risk_score(desc(0.12), ()) == pytest.approx(0.12, abs=1e-6)


@pytest.mark.parametrize(("band", "quarantine_only", "tier", "handling"), [
    (LOW, False, SAFE, STANDARD), (MEDIUM, False, SAFE, STANDARD), (HIGH, False, SAFE, RESTRICTED),
    (CRITICAL, False, SAFE, QUARANTINE), (LOW, True, SAFE, QUARANTINE), (HIGH, False, HIGH_RISK, QUARANTINE),
])
def test_handling(band: pb.HazardBand.ValueType, quarantine_only: bool, tier: pb.BlueprintTier.ValueType,
                  handling: int) -> None:
    assert handling_class(band, desc(0.1, tier, quarantine_only=quarantine_only)) == handling


def test_resource_profile(clean: CrucibleReport) -> None:
    assert resource_profile(clean) == pb.RESOURCE_PROFILE_CPU
    assert resource_profile(dataclasses.replace(clean, device="cuda:0")) == pb.RESOURCE_PROFILE_GPU
    assert resource_profile(with_hazards(clean, "memory_growth")) == pb.RESOURCE_PROFILE_MEMORY_HEAVY
    heavy = dataclasses.replace(clean, memory=dataclasses.replace(clean.memory, param_bytes=1 << 30))
    assert resource_profile(heavy) == pb.RESOURCE_PROFILE_MEMORY_HEAVY


def test_sheet_fields(clean: CrucibleReport) -> None:
    sheet = issue_bsds(desc(0.1, blueprint_id="BP002"), clean, now=NOW)
    assert sheet.version == 1 and sheet.blueprint_id == "BP002"
    assert sheet.provenance == pb.PROVENANCE_URABRASK
    assert sheet.issued_at.ToDatetime(tzinfo=UTC) == NOW
    assert sheet.resource_profile == pb.RESOURCE_PROFILE_CPU
    assert sheet.recommendation.startswith("LOW / STANDARD (slot v16, cpu): no hazards measured")


def test_sheet_lists_measured_hazards() -> None:
    report = run_crucible(m.Noisy, SlotShape(m.C))
    sheet = issue_bsds(desc(0.1), report, now=NOW)
    assert (sheet.hazard_band, sheet.handling_class) == (HIGH, RESTRICTED)
    assert "measured hazards oscillation, precision" in sheet.recommendation
    assert "determinism: identical calls differ by" in sheet.recommendation


def test_issued_at_defaults_to_now(clean: CrucibleReport) -> None:
    before = datetime.now(UTC)
    sheet = issue_bsds(desc(), clean)
    assert before <= sheet.issued_at.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
