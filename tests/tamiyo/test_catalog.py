"""Blueprint metadata: Leyline catalogue → BlueprintInfo, TTL view, explicit failures (real Redis)."""

from __future__ import annotations

import pytest

from esper.core.breaker import CircuitBreaker
from esper.core.errors import DependencyViolationError
from esper.leyline import pb
from esper.tamiyo.catalog import BlueprintCatalog, blueprint_from_entry
from tests.conftest import ClientFactory
from tests.tamiyo._fleet import catalog, urza_stand_in


def test_entry_conversion_keeps_absence_as_none() -> None:
    entry = catalog().entries[0]
    entry.graph.layers.add(layer_type="conv")  # every optional field absent
    info = blueprint_from_entry(entry)
    assert info.blueprint_id == "BP001" and info.bsds is None
    assert info.layers[0].depth == 1.0 and info.layers[2].depth is None and info.layers[2].latency_ms is None
    assert info.parameters[0].default == pytest.approx(0.1)
    assert info.adjacency == ((0, 1),) and info.monitored_layers == (0,)
    assert info.candidate_score is None


def test_entry_without_id_or_with_dangling_layer_index_is_refused() -> None:
    nameless = pb.BlueprintCatalogEntry(descriptor=pb.BlueprintDescriptor(name="x"))
    with pytest.raises(DependencyViolationError):
        blueprint_from_entry(nameless)
    dangling = catalog().entries[0]
    dangling.graph.adjacency.add(src=0, dst=7)
    with pytest.raises(DependencyViolationError):
        blueprint_from_entry(dangling)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_refresh_view_ttl_and_explicit_timeout(make_client: ClientFactory) -> None:
    client = await make_client("tamiyo")
    urza = await make_client("urza")
    failures: list[str] = []
    clock = Clock()
    cat = BlueprintCatalog(client, timeout_ms=100, ttl_s=10, breaker=CircuitBreaker("metadata"),
                           on_failure=lambda code, detail: failures.append(code), clock=clock)
    assert cat.view().failure is None and cat.view().blueprints == () and cat.due()
    assert not await cat.refresh()  # nobody answers: explicit timeout, no data invented
    assert failures == ["timeout_urza"] and cat.view().failure == "timeout_urza"
    assert cat.breaker.failures == 1
    async with urza_stand_in(urza) as answered:
        assert await cat.refresh()
    assert len(answered) == 1 and [b.blueprint_id for b in cat.view().blueprints] == ["BP001"]
    assert cat.view().failure is None and not cat.due()
    clock.now = 11.0  # past the TTL: expired data is not used
    view = cat.view()
    assert view.blueprints == () and view.failure == "metadata_expired"
