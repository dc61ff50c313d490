"""The crucible over the whole Karn catalogue: every negative control is caught by measurement, every
SAFE design passes clean. Each template is probed on a vector-64 slot and, where it fits, a conv
16x8x8 slot; reports are computed once per (template, slot) and shared by the assertions."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

import pytest

from esper.karn import CATALOGUE, SlotShape, descriptor, get_template, templates_for
from esper.leyline import pb
from esper.urabrask import HAZARD_EXCEPTION, CrucibleReport, issue_bsds, run_crucible

SLOTS = (SlotShape(64), SlotShape(16, 8, 8))
NOW = datetime(2025, 9, 1, tzinfo=UTC)


def cases(tier: pb.BlueprintTier.ValueType) -> list[pytest.ParameterSet]:
    return [pytest.param(t.blueprint_id, slot.as_key(), id=f"{t.blueprint_id}-{t.name}-{slot.as_key()}")
            for slot in SLOTS for t in templates_for(slot, tier)]


@functools.cache
def probe(blueprint_id: str, slot_key: str) -> tuple[CrucibleReport, pb.BSDS]:
    template, slot = get_template(blueprint_id), SlotShape.from_key(slot_key)
    report = run_crucible(lambda: template.build(slot), slot, seed=0)
    return report, issue_bsds(descriptor(template), report, now=NOW)


def test_catalogue_has_every_tier() -> None:
    tiers = {t.tier for t in CATALOGUE.values()}
    assert tiers == {pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL, pb.BLUEPRINT_TIER_HIGH_RISK}
    assert len(cases(pb.BLUEPRINT_TIER_HIGH_RISK)) >= 8


@pytest.mark.parametrize(("blueprint_id", "slot_key"), cases(pb.BLUEPRINT_TIER_HIGH_RISK))
def test_high_risk_is_flagged_and_quarantined(blueprint_id: str, slot_key: str) -> None:
    report, sheet = probe(blueprint_id, slot_key)
    assert report.hazards, f"no hazard measured: {report.latency.reason}"
    assert HAZARD_EXCEPTION not in report.hazards, report.findings
    assert sheet.hazard_band in (pb.HAZARD_BAND_HIGH, pb.HAZARD_BAND_CRITICAL)
    assert sheet.handling_class == pb.HANDLING_CLASS_QUARANTINE


@pytest.mark.parametrize(("blueprint_id", "slot_key"), cases(pb.BLUEPRINT_TIER_SAFE))
def test_safe_is_clean(blueprint_id: str, slot_key: str) -> None:
    report, sheet = probe(blueprint_id, slot_key)
    assert report.hazards == (), report.findings
    assert sheet.hazard_band in (pb.HAZARD_BAND_LOW, pb.HAZARD_BAND_MEDIUM)
    assert sheet.handling_class == pb.HANDLING_CLASS_STANDARD


@pytest.mark.parametrize(("blueprint_id", "slot_key"), cases(pb.BLUEPRINT_TIER_EXPERIMENTAL))
def test_experimental_runs_and_gets_a_sheet(blueprint_id: str, slot_key: str) -> None:
    report, sheet = probe(blueprint_id, slot_key)
    assert HAZARD_EXCEPTION not in report.hazards, report.findings
    assert sheet.blueprint_id == blueprint_id and sheet.hazard_band != pb.HAZARD_BAND_UNSPECIFIED
