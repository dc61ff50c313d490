"""The crucible on hand-written modules: hazards, reproducibility, and no side effects on the caller."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.karn.template import SlotShape
from esper.urabrask import DEFAULT_THRESHOLDS, HAZARDS, CrucibleReport, Thresholds, run_crucible
from tests.urabrask import modules as m

SLOT = SlotShape(m.C)


@pytest.mark.parametrize(("factory", "hazards"), [
    (m.Clean, ()),
    (nn.Identity, ()),
    (m.ZeroInitBranch, ()),
    (m.NaNOut, ("nan",)),
    (m.GainStack, ("gradient_explode",)),
    (m.deep_sigmoid, ("gradient_vanish",)),
    (m.Leak, ("memory_growth",)),
    (m.Noisy, ("oscillation", "precision")),
    (m.Drifting, ("oscillation", "precision")),
    (m.Cancellation, ("precision",)),
    (m.Sleeper, ("latency",)),
    (m.Raises, ("exception",)),
])
def test_hazards(factory: Callable[[], nn.Module], hazards: tuple[str, ...]) -> None:
    report = run_crucible(factory, SLOT)
    assert report.hazards == hazards, report.findings
    assert report.clean is (not hazards)
    assert len(report.findings) >= len(hazards) - 1  # one probe may report two hazards (gradient)


def test_report_fields() -> None:
    report = run_crucible(m.Clean, SLOT, seed=3)
    assert (report.slot, report.device, report.seed) == ("v16", "cpu", 3)
    assert report.thresholds is DEFAULT_THRESHOLDS
    assert [name for name, _ in report.probe_seconds] == [
        "nan", "gradient", "precision", "determinism", "memory", "latency"]
    assert all(s >= 0 for _, s in report.probe_seconds)
    assert report.total_seconds == pytest.approx(sum(s for _, s in report.probe_seconds))
    assert 0 < report.latency_p50_ms <= report.latency_p95_ms
    assert report.param_bytes == (m.C * m.C + m.C) * 4
    assert not report.on_gpu and report.findings == ()


def test_hazards_are_ordered_most_severe_first() -> None:
    report = run_crucible(m.Noisy, SLOT)
    assert list(report.hazards) == sorted(report.hazards, key=HAZARDS.index)


def _measured(report: CrucibleReport) -> tuple[object, ...]:
    return (report.nan, report.gradient, report.precision, report.determinism, report.memory, report.hazards)


@pytest.mark.parametrize("factory", [m.Clean, m.Noisy])
def test_same_seed_same_measurements(factory: Callable[[], nn.Module]) -> None:
    """Everything but latency is a pure function of the seed (modules' own randomness included)."""
    a, b = run_crucible(factory, SLOT, seed=7), run_crucible(factory, SLOT, seed=7)
    assert _measured(a) == _measured(b)
    assert run_crucible(factory, SLOT, seed=8).gradient != a.gradient


def test_caller_state_is_left_alone() -> None:
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    run_crucible(m.Noisy, SLOT)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads


def test_fresh_module_per_probe() -> None:
    built: list[m.Leak] = []

    def factory() -> nn.Module:
        built.append(m.Leak())
        return built[-1]

    report = run_crucible(factory, SLOT)
    assert len(built) == 6
    assert all(torch.equal(built[0].proj.weight, b.proj.weight) for b in built)  # same seeded init
    assert report.memory.flagged and not report.determinism.flagged


def test_conv_slot() -> None:
    report = run_crucible(m.Conv, SlotShape(m.C, 4, 4))
    assert report.slot == "c16x4x4" and report.clean, report.findings


def test_thresholds_are_honoured() -> None:
    strict = Thresholds(determinism_rel_diff=1e-12, precision_rel_error=1e-12)
    drifting = dataclasses.replace(DEFAULT_THRESHOLDS, determinism_rel_diff=1e3, precision_rel_error=1e3)
    assert "precision" in run_crucible(m.Clean, SLOT, thresholds=strict).hazards
    assert run_crucible(m.Drifting, SLOT, thresholds=drifting).clean


@pytest.mark.parametrize("bad", [
    {"determinism_calls": 1}, {"memory_calls": 0}, {"grad_vanish_ratio": 0.0}, {"grad_explode_ratio": 0.5},
])
def test_thresholds_validate(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Thresholds(**bad)  # type: ignore[arg-type]
