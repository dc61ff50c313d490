"""The catalogue's shape: ids, tiers, risk priors, coverage of slot kinds, lookups and parameter rules."""

from __future__ import annotations

import re

import pytest

from esper.karn import (
    CATALOGUE,
    TIER_RANGES,
    BlueprintParameterError,
    BlueprintTemplate,
    KarnError,
    SlotMismatchError,
    UnknownBlueprintError,
    get_template,
    templates_for,
)
from esper.karn.designs import LoRAAdapter
from esper.leyline import pb

from .cases import CONV, VECTOR

SAFE, EXPERIMENTAL, HIGH_RISK = pb.BLUEPRINT_TIER_SAFE, pb.BLUEPRINT_TIER_EXPERIMENTAL, pb.BLUEPRINT_TIER_HIGH_RISK

HAZARD_NAMES = {
    "BP043": "exploding_gradient", "BP044": "vanishing_gradient", "BP045": "nan_injection",
    "BP046": "infinite_loop", "BP047": "memory_leak", "BP048": "deadlock_pattern",
    "BP049": "race_condition", "BP050": "adversarial_noise",
}
RISK_BANDS = {SAFE: (0.05, 0.2), EXPERIMENTAL: (0.3, 0.5), HIGH_RISK: (0.8, 0.95)}


def test_ids_are_keys_well_formed_and_names_unique() -> None:
    for key, template in CATALOGUE.items():
        assert key == template.blueprint_id
        assert re.fullmatch(r"BP0\d\d", key)
    names = [t.name for t in CATALOGUE.values()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)


@pytest.mark.parametrize("template", CATALOGUE.values(), ids=list(CATALOGUE))
def test_tier_matches_id_range_and_risk_band(template: BlueprintTemplate) -> None:
    number = int(template.blueprint_id[2:])
    assert number in TIER_RANGES[template.tier]
    low, high = RISK_BANDS[template.tier]
    assert low <= template.risk <= high
    assert template.description.endswith(".") and template.description.count(". ") == 0
    assert template.quarantine_only == (template.tier == HIGH_RISK)


def test_tier_sizes_and_slot_coverage() -> None:
    safe = templates_for(VECTOR, SAFE)
    assert CATALOGUE["BP001"].name == "identity_passthrough" and CATALOGUE["BP001"].tier == SAFE
    assert len([t for t in CATALOGUE.values() if t.tier == SAFE]) >= 13
    assert len(safe) >= 12
    assert len(templates_for(CONV, SAFE)) >= 6
    assert 3 <= len([t for t in CATALOGUE.values() if t.tier == EXPERIMENTAL]) <= 7


def test_high_risk_ids_and_names_are_the_prototypes() -> None:
    hazards = {t.blueprint_id: t.name for t in CATALOGUE.values() if t.tier == HIGH_RISK}
    assert hazards == HAZARD_NAMES
    for bid in HAZARD_NAMES:
        template = CATALOGUE[bid]
        assert template.quarantine_only and template.approval_required
        assert template.blend_methods == ()


def test_templates_for_filters_by_kind_and_tier() -> None:
    conv_only = {t.blueprint_id for t in CATALOGUE.values() if t.slot_kinds == frozenset({"conv"})}
    assert conv_only  # some designs need pixels
    assert not conv_only & {t.blueprint_id for t in templates_for(VECTOR)}
    assert conv_only <= {t.blueprint_id for t in templates_for(CONV)}
    assert {t.tier for t in templates_for(CONV, EXPERIMENTAL)} == {EXPERIMENTAL}
    ids = [t.blueprint_id for t in templates_for(VECTOR)]
    assert ids == sorted(ids)


def test_unknown_id_raises_typed_key_error() -> None:
    with pytest.raises(UnknownBlueprintError) as info:
        get_template("BP999")
    assert isinstance(info.value, KeyError) and isinstance(info.value, KarnError)
    assert get_template("BP002") is CATALOGUE["BP002"]


def test_wrong_slot_kind_is_rejected() -> None:
    with pytest.raises(SlotMismatchError):
        get_template("BP007").build(VECTOR)  # depthwise conv needs pixels


def test_parameters_out_of_range_or_unknown_are_rejected() -> None:
    template = get_template("BP005")
    with pytest.raises(BlueprintParameterError, match="rank"):
        template.build(VECTOR, {"rank": 0})
    with pytest.raises(BlueprintParameterError, match="outside"):
        template.build(VECTOR, {"alpha": 1000.0})
    with pytest.raises(BlueprintParameterError, match="unknown"):
        template.build(VECTOR, {"depth": 3})


def test_integer_parameters_are_rounded_and_honoured() -> None:
    template = get_template("BP005")
    assert template.resolve_params({"rank": 6.6})["rank"] == 7.0
    module = template.build(VECTOR, {"rank": 6.6})
    assert isinstance(module, LoRAAdapter)
    assert module.lora_a.weight.shape == (7, 64)
    assert template.resolve_params() == {"rank": 4.0, "alpha": 8.0, "dropout": 0.0}
