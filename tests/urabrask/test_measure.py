"""The measurement helpers: reachable tensor bytes, relative error, percentiles, the op trace."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper.karn.template import SlotShape
from esper.urabrask import reachable_tensor_bytes, reference_module, trace_forward
from esper.urabrask.measure import percentile, relative_l2
from tests.urabrask import modules as m

CPU = torch.device("cpu")


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)                                  # 80 bytes of parameters
        first = torch.zeros(10)
        self.plain: list[object] = [first, {"nested": (torch.zeros(5),)}]  # 40 + 20 bytes
        self.alias = self.proj.weight                                      # shared storage: counted once
        self.view = first[:5]                                              # a view of a counted storage
        self.cycle = self.plain                                            # cycles terminate


def test_reachable_bytes_walks_attributes_containers_and_dedupes_storages() -> None:
    nbytes, truncated = reachable_tensor_bytes(Holder(), 10_000)
    assert (nbytes, truncated) == (80 + 40 + 20, False)


def test_reachable_bytes_is_bounded() -> None:
    holder = Holder()
    holder.plain.extend(torch.zeros(1) for _ in range(100))
    nbytes, truncated = reachable_tensor_bytes(holder, 50)
    assert truncated and nbytes < 80 + 40 + 20 + 400


@pytest.mark.parametrize(("a", "b", "expected"), [
    ([1.0, 2.0], [1.0, 2.0], 0.0),
    ([0.0, 0.0], [0.0, 0.0], 0.0),
    ([1.0, 0.0], [0.0, 0.0], math.inf),
    ([3.0, 4.0], [0.0, 0.0], math.inf),
    ([0.0, 5.0], [0.0, 4.0], 0.25),
    ([math.nan, 1.0], [math.nan, 1.0], 0.0),        # same non-finite entries at the same places
    ([math.nan, 1.0], [1.0, 1.0], math.inf),
    ([math.inf, 1.0], [math.nan, 1.0], math.inf),   # same place, different kind
])
def test_relative_l2(a: list[float], b: list[float], expected: float) -> None:
    assert relative_l2(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected)


@pytest.mark.parametrize(("samples", "q", "expected"), [
    ([3.0, 1.0, 2.0], 0.5, 2.0),
    (list(map(float, range(1, 21))), 0.95, 19.0),
    ([5.0], 0.95, 5.0),
])
def test_percentile_nearest_rank(samples: list[float], q: float, expected: float) -> None:
    assert percentile(samples, q) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize("slot", [SlotShape(8), SlotShape(8, 3, 3)])
def test_reference_is_seeded_and_shape_preserving(slot: SlotShape) -> None:
    a = reference_module(slot, torch.Generator().manual_seed(1), CPU)
    b = reference_module(slot, torch.Generator().manual_seed(1), CPU)
    for pa, pb_ in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb_)
    x = slot.example_input(2)
    assert a(x).shape == x.shape


def test_trace_separates_live_from_dead_ops() -> None:
    x = torch.randn(4, m.C)
    clean = trace_forward(m.Clean(), x, CPU)
    assert clean.dead_ops == 0 and clean.live_ops > 0 and clean.live_ms == clean.ops_ms
    spin = trace_forward(m.Spinner(), x, CPU)
    assert spin.dead_ops > spin.live_ops and spin.live_ms < spin.ops_ms


def test_trace_sees_state_updates_after_the_output_as_dead() -> None:
    trace = trace_forward(m.Drifting(), torch.randn(4, m.C), CPU)
    assert trace.dead_ops == 0  # the counter is bumped *before* it is read: it feeds the output
    leak = trace_forward(m.Leak(), torch.randn(4, m.C), CPU)
    assert leak.dead_ops >= 1   # the retained copy is never read
