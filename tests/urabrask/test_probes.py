"""Each probe, table-tested on small hand-written modules (no catalogue, no names: only behaviour)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from esper.karn.template import SlotShape
from esper.urabrask import (
    DEFAULT_THRESHOLDS,
    HAZARD_EXCEPTION,
    HAZARD_GRADIENT_EXPLODE,
    HAZARD_GRADIENT_VANISH,
    ProbeResult,
    Thresholds,
    probe_determinism,
    probe_gradient,
    probe_latency,
    probe_memory,
    probe_nan,
    probe_precision,
    probes,
)
from tests.urabrask import modules as m

SLOT = SlotShape(m.C)
TH = DEFAULT_THRESHOLDS
Factory = Callable[[], nn.Module]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """As the crucible runs them: seeded, one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("factory", "flagged"), [
    (m.Clean, False), (nn.Identity, False), (m.Noisy, False), (m.GainStack, False),
    (m.NaNOut, True),
])
def test_nan(factory: Factory, flagged: bool) -> None:
    r = probe_nan(factory, SLOT, generator=gen())
    assert r.flagged is flagged
    assert r.error is None and r.calls == TH.nan_calls
    assert (r.nonfinite_outputs > 0) is flagged
    assert r.hazards == (("nan",) if flagged else ())


@pytest.mark.parametrize(("factory", "explode", "vanish"), [
    (m.Clean, False, False),
    (nn.Identity, False, False),       # no parameters, but the input gradient flows
    (m.ZeroInitBranch, False, False),  # no input gradient at first, recovers after an SGD step
    (m.GainStack, True, False),
    (m.deep_sigmoid, False, True),
    (m.Silence, False, True),          # no parameters and no input gradient
    (m.NaNOut, False, False),          # NaN written over outputs blocks their gradient: the nan probe's job
])
def test_gradient(factory: Factory, explode: bool, vanish: bool) -> None:
    r = probe_gradient(factory, SLOT, generator=gen())
    assert r.error is None
    assert (r.explode, r.vanish, r.flagged) == (explode, vanish, explode or vanish)
    assert r.ref_input_grad_norm > 0 and r.ref_param_grad_norm > 0
    if explode:
        assert not r.input_ratio <= TH.grad_explode_ratio or not r.param_ratio <= TH.grad_explode_ratio
    else:
        assert r.input_ratio <= TH.grad_explode_ratio and r.param_ratio <= TH.grad_explode_ratio
    if vanish:
        assert r.input_ratio < TH.grad_vanish_ratio
        assert not r.recovered_input_ratio >= TH.grad_vanish_ratio
    expected = (HAZARD_GRADIENT_EXPLODE,) * explode + (HAZARD_GRADIENT_VANISH,) * vanish
    assert r.hazards == expected


def test_gradient_numbers() -> None:
    clean = probe_gradient(m.Clean, SLOT, generator=gen())
    assert 0.1 < clean.input_ratio < 10 and 0.1 < clean.param_ratio < 10  # a default Linear vs a default Linear
    boom = probe_gradient(m.GainStack, SLOT, generator=gen())
    assert boom.input_ratio > 1e6  # gain 1e4 on the output and again on the way back
    zero = probe_gradient(m.ZeroInitBranch, SLOT, generator=gen())
    assert zero.input_ratio == 0.0 and zero.recovered_input_ratio >= TH.grad_vanish_ratio


@pytest.mark.parametrize(("factory", "flagged", "float64_ok"), [
    (m.Clean, False, True), (nn.Identity, False, True), (m.GainStack, False, True),
    (m.Cancellation, True, True), (m.Noisy, True, True),
    (m.Float32Only, True, False),  # breaking in float64 is a finding, not a crash
])
def test_precision(factory: Factory, flagged: bool, float64_ok: bool) -> None:
    r = probe_precision(factory, SLOT, generator=gen())
    assert r.error is None
    assert (r.flagged, r.float64_ok) == (flagged, float64_ok)
    if float64_ok:
        assert (r.relative_error > TH.precision_rel_error) is flagged
    else:
        assert "float64 forward failed" in r.reason
    assert r.hazards == (("precision",) if flagged else ())


@pytest.mark.parametrize(("factory", "flagged"), [
    (m.Clean, False), (m.LastOutputCache, False), (m.Leak, False),
    (lambda: nn.Sequential(nn.Linear(m.C, m.C), nn.Dropout(0.5)), False),  # eval mode: dropout is off
    (m.Noisy, True), (m.Drifting, True),
])
def test_determinism(factory: Factory, flagged: bool) -> None:
    r = probe_determinism(factory, SLOT, generator=gen())
    assert r.error is None and r.calls == TH.determinism_calls
    assert r.flagged is flagged
    assert (r.max_relative_diff > TH.determinism_rel_diff) is flagged
    if not flagged:
        assert r.max_relative_diff == 0.0


@pytest.mark.parametrize(("factory", "flagged"), [
    (m.Clean, False), (m.LastOutputCache, False), (m.Drifting, False), (nn.Identity, False),
    (m.Leak, True),
])
def test_memory(factory: Factory, flagged: bool) -> None:
    r = probe_memory(factory, SLOT, generator=gen())
    assert r.error is None and r.calls == TH.memory_calls and not r.walk_truncated
    assert r.flagged is flagged
    assert r.param_bytes == sum(p.numel() * 4 for p in factory().parameters())
    assert r.bytes_before >= r.param_bytes
    assert r.slack_bytes == max(TH.memory_slack_bytes, int(TH.memory_slack_param_fraction * r.param_bytes))
    if flagged:
        output_bytes = TH.memory_batch * m.C * 4
        assert r.growth_bytes == TH.memory_calls * output_bytes > r.slack_bytes
    else:
        assert r.growth_bytes == 0


def test_memory_slack_scales_with_parameters() -> None:
    th = Thresholds(memory_slack_bytes=0, memory_slack_param_fraction=100.0)
    r = probe_memory(m.Leak, SLOT, generator=gen(), thresholds=th)
    assert r.growth_bytes > 0 and not r.flagged  # the leak is smaller than 100x the parameters


@pytest.mark.parametrize(("factory", "flagged"), [
    (m.Clean, False), (nn.Identity, False), (m.deep_sigmoid, False),
    (m.HeavyButHonest, False),  # slow because it computes its output: a cost, not a hazard
    (m.Sleeper, True),          # waits ~5 ms per call
    (m.Spinner, True),          # busy ~4 ms per call on results it throws away
])
def test_latency(factory: Factory, flagged: bool) -> None:
    r = probe_latency(factory, SLOT, generator=gen())
    assert r.error is None and r.samples >= 5
    assert r.p50_ms <= r.p95_ms and r.ref_p50_ms <= r.ref_p95_ms
    assert r.flagged is flagged, r.reason
    if flagged:  # the probe's own relative decision: every condition held
        assert r.p95_ratio > TH.latency_p95_ratio and r.p95_ms > TH.latency_floor_ms
        assert r.stall_share >= TH.latency_stall_share


def test_latency_counts_dead_ops() -> None:
    r = probe_latency(m.Spinner, SLOT, generator=gen())
    assert r.dead_ops > 0 and r.ops > r.dead_ops
    assert probe_latency(m.Clean, SLOT, generator=gen()).dead_ops == 0


@pytest.mark.parametrize(("factory", "flagged"), [(m.Clean, False), (m.Sleeper, True)])
def test_latency_without_op_trace(monkeypatch: pytest.MonkeyPatch, factory: Factory, flagged: bool) -> None:
    """A module the op tracer cannot follow is judged by its timings alone, never as an exception."""
    def untraceable(*_: object) -> None:
        raise RuntimeError("no dispatch mode here")

    monkeypatch.setattr(probes, "trace_forward", untraceable)
    r = probe_latency(factory, SLOT, generator=gen())
    assert r.error is None and r.flagged is flagged
    assert math.isnan(r.stall_share) and "op trace failed" in r.reason


PROBES = [probe_nan, probe_gradient, probe_precision, probe_determinism, probe_memory, probe_latency]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.__name__)
@pytest.mark.parametrize(("factory", "needle"), [
    (m.Raises, "RuntimeError: boom"),
    (m.WrongShape, "shape"),
    (lambda: "not a module", "not an nn.Module"),
    (lambda: 1 / 0, "ZeroDivisionError"),  # the factory itself fails
])
def test_exceptions_are_findings(probe: Callable[..., ProbeResult], factory: Factory, needle: str) -> None:
    r = probe(factory, SLOT, generator=gen())
    assert r.flagged is True
    assert r.hazards == (HAZARD_EXCEPTION,)
    error = r.error
    assert error is not None and error.startswith("exception: ") and needle in error


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.__name__)
def test_conv_slot(probe: Callable[..., ProbeResult]) -> None:
    r = probe(m.Conv, SlotShape(m.C, 4, 4), generator=gen())
    assert r.flagged is False, r.reason


def test_probe_accepts_a_module() -> None:
    module = m.NaNOut()
    r = probe_nan(module, SLOT, generator=gen())
    assert r.flagged and math.isnan(float(module(torch.zeros(2, m.C))[0, 0].detach()))
