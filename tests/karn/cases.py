"""Shared test cases: the two reference slots and every (template, slot) pair that fits."""

from __future__ import annotations

from esper.karn import CATALOGUE, BlueprintTemplate, SlotShape
from esper.leyline import pb

VECTOR = SlotShape(64)
CONV = SlotShape(16, 8, 8)
SLOTS = (VECTOR, CONV)


def fitting(*tiers: int) -> list[tuple[BlueprintTemplate, SlotShape]]:
    return [(t, s) for t in CATALOGUE.values() if t.tier in tiers for s in SLOTS if s.kind in t.slot_kinds]


def case_id(case: tuple[BlueprintTemplate, SlotShape]) -> str:
    template, slot = case
    return f"{template.blueprint_id}-{template.name}-{slot.as_key()}"


TRAINABLE = fitting(pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL)
HAZARDS = [t for t in CATALOGUE.values() if t.tier == pb.BLUEPRINT_TIER_HIGH_RISK]


def first_slot(template: BlueprintTemplate) -> SlotShape:
    return VECTOR if "vector" in template.slot_kinds else CONV
