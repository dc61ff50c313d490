"""The catalogue: every blueprint template by id, and lookups by id and by slot.

Ids follow the prototype's tiers: BP001-BP035 SAFE, BP036-BP042 EXPERIMENTAL, BP043-BP050 HIGH_RISK
(quarantine-only). The SAFE and EXPERIMENTAL ranges have gaps, left for future designs; ids are never
reused, since artifacts name their template by id.

| ids | tier | designs |
|---|---|---|
| BP001-BP006, BP010-BP014, BP018, BP019 | SAFE | channel-wise (`designs.py`) |
| BP007-BP009, BP015-BP017 | SAFE | spatial, conv slots only (`spatial.py`) |
| BP036-BP040 | EXPERIMENTAL | `experimental.py` |
| BP043-BP050 | HIGH_RISK | negative controls (`hazards.py`) |
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from esper.karn import designs, experimental, hazards, spatial
from esper.karn.template import BlueprintTemplate, SlotShape, UnknownBlueprintError
from esper.leyline import pb

#: Tier → the id numbers it owns (BP001 → 1).
TIER_RANGES: Mapping[pb.BlueprintTier.ValueType, range] = MappingProxyType({
    pb.BLUEPRINT_TIER_SAFE: range(1, 36),
    pb.BLUEPRINT_TIER_EXPERIMENTAL: range(36, 43),
    pb.BLUEPRINT_TIER_HIGH_RISK: range(43, 51),
})


def _index(*groups: tuple[BlueprintTemplate, ...]) -> Mapping[str, BlueprintTemplate]:
    entries: dict[str, BlueprintTemplate] = {}
    for template in (t for group in groups for t in group):
        if template.blueprint_id in entries:
            raise ValueError(f"duplicate blueprint id {template.blueprint_id}")
        entries[template.blueprint_id] = template
    return MappingProxyType(dict(sorted(entries.items())))


CATALOGUE: Mapping[str, BlueprintTemplate] = _index(
    designs.TEMPLATES, spatial.TEMPLATES, experimental.TEMPLATES, hazards.TEMPLATES)


def get_template(blueprint_id: str) -> BlueprintTemplate:
    """The template for `blueprint_id`; `UnknownBlueprintError` (a KeyError) if there is none."""
    try:
        return CATALOGUE[blueprint_id]
    except KeyError:
        raise UnknownBlueprintError(f"unknown blueprint id {blueprint_id!r}") from None


def templates_for(slot: SlotShape, tier: pb.BlueprintTier.ValueType | None = None) -> list[BlueprintTemplate]:
    """Templates that fit `slot`'s kind (optionally of one tier), in id order."""
    return [t for t in CATALOGUE.values() if slot.kind in t.slot_kinds and (tier is None or t.tier == tier)]
