"""Urza against Karn's real catalogue: seeding descriptors and graphs, round trips of real templates."""

from __future__ import annotations

from pathlib import Path

import torch

from esper.karn.catalogue import CATALOGUE, get_template
from esper.karn.graph import blueprint_graph, descriptor
from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.urza.artifact import checksum, load_artifact, pack_artifact, rebuild
from esper.urza.library import UrzaLibrary
from tests.conftest import ClientFactory
from tests.urza._service import running_urza, urza_settings


def test_seed_from_karn_registers_every_descriptor_and_fitting_graphs(tmp_path: Path) -> None:
    with UrzaLibrary(tmp_path / "c.db", tmp_path / "a") as lib:
        assert lib.seed_from_karn() == len(CATALOGUE)
        assert [d.blueprint_id for d in lib.blueprints()] == sorted(CATALOGUE)
        assert not any(e.HasField("graph") for e in lib.catalog_entries(include_graph=True))
        slot = SlotShape(64)
        lib.seed_from_karn("v64")
        entries = {e.descriptor.blueprint_id: e for e in lib.catalog_entries(include_graph=True)}
        for bid, template in CATALOGUE.items():
            assert entries[bid].descriptor == descriptor(template)
            assert entries[bid].HasField("graph") == (slot.kind in template.slot_kinds), bid
        fits = next(t for t in CATALOGUE.values() if "vector" in t.slot_kinds)
        torch.manual_seed(0)
        assert entries[fits.blueprint_id].graph == blueprint_graph(fits, slot)  # deterministic across starts
        torch.manual_seed(1)
        before = torch.rand(2)
        torch.manual_seed(1)
        lib.seed_from_karn("v64")
        assert torch.equal(torch.rand(2), before)  # the caller's RNG is untouched


def test_every_template_round_trips_bit_exact_through_the_library(tmp_path: Path) -> None:
    with UrzaLibrary(tmp_path / "c.db", tmp_path / "a") as lib:
        for template in CATALOGUE.values():
            slot = SlotShape(8) if "vector" in template.slot_kinds else SlotShape(4, 6, 6)
            params = template.resolve_params()
            torch.manual_seed(3)
            original = template.build(slot, params).eval()
            data = pack_artifact(template.blueprint_id, slot, params, original.state_dict())
            rec = lib.register_kernel(template.blueprint_id, slot, data, compile_ms=1, prewarm_p50_ms=1,
                                      prewarm_p95_ms=1)
            _, raw = lib.fetch_artifact(rec.kernel_id)
            rebuilt = rebuild(load_artifact(raw, rec.checksum)).eval()  # default lookup: Karn's catalogue
            assert type(rebuilt) is type(original) and get_template(template.blueprint_id) is template
            want, got = original.state_dict(), rebuilt.state_dict()
            assert list(want) == list(got), template.blueprint_id
            for name in want:
                assert want[name].dtype == got[name].dtype
                assert want[name].numpy().tobytes() == got[name].numpy().tobytes(), (template.blueprint_id, name)
            if template.tier != pb.BLUEPRINT_TIER_HIGH_RISK:  # hazards misbehave on purpose when run
                x = slot.example_input(3, generator=torch.Generator().manual_seed(2))
                with torch.no_grad():
                    assert torch.equal(original(x), rebuilt(x)), template.blueprint_id
        assert checksum(raw) == rec.checksum


async def test_service_seeds_karn_on_start(make_client: ClientFactory, settings: OonaSettings,
                                           tmp_path: Path) -> None:
    tamiyo = await make_client("tamiyo")
    async with running_urza(urza_settings(settings, tmp_path, seed_karn=True, seed_slot="v64")) as urza:
        assert await urza.seed() == len(CATALOGUE)
        reply = await tamiyo.request("blueprint.query", pb.BlueprintQuery(request_id="q", include_graph=True,
                                                                         blueprint_ids=["BP001"]), timeout_ms=5000)
    [entry] = reply.message_as(pb.BlueprintCatalog).entries
    assert entry.descriptor == descriptor(get_template("BP001")) and entry.HasField("graph")
