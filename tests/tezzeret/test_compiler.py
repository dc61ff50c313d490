"""Tezzeret: artifacts rebuild bit-exact, validation is strict, retries and the forge pass."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper.karn import CATALOGUE, BlueprintTemplate, SlotShape
from esper.leyline import pb
from esper.tezzeret.compiler import CompileError, compile_blueprint, compile_with_retries
from esper.tezzeret.forge import forge_once
from esper.tezzeret.metrics import TezzeretMetrics
from esper.urza.artifact import checksum, kernel_id, load_artifact, rebuild
from esper.urza.library import UrzaLibrary

V64 = SlotShape(64)
CPU = torch.device("cpu")


def _fits(t: BlueprintTemplate) -> SlotShape:
    return V64 if "vector" in t.slot_kinds else SlotShape(16, 8, 8)


@pytest.mark.parametrize("bid", [b for b, t in CATALOGUE.items() if t.tier != pb.BLUEPRINT_TIER_HIGH_RISK])
def test_artifact_holds_the_initial_weights_and_rebuilds_bit_exact(bid: str) -> None:
    template = CATALOGUE[bid]
    slot = _fits(template)
    result = compile_blueprint(template, slot, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        fresh = template.build(slot).eval()
    artifact = load_artifact(result.artifact, checksum(result.artifact))
    rebuilt = rebuild(artifact).eval()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, rebuilt.state_dict()[name]), name
    x = slot.example_input(4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(fresh(x), rebuilt(x))
    assert artifact.guard_digest == result.guard_digest
    assert result.prewarm_p50_ms <= result.prewarm_p95_ms
    assert (result.mode, result.compiled, result.retries) == ("standard", False, 0)  # CPU: eager


def _template(factory: object, bid: str = "TST900") -> BlueprintTemplate:
    return BlueprintTemplate(blueprint_id=bid, name="test", tier=pb.BLUEPRINT_TIER_SAFE, description="test",
                             risk=0.1, factory=factory)  # type: ignore[arg-type]


class _Shrink(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _ToDouble(_Shrink):
    def __init__(self, c: int) -> None:
        super().__init__(2 * c)
        self.lin = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).double()


def test_shape_and_dtype_mismatches_are_permanent_errors() -> None:
    with pytest.raises(CompileError) as exc:
        compile_with_retries(_template(lambda s, p: _Shrink(s.channels)), V64)
    assert exc.value.reason == "shape_mismatch"
    with pytest.raises(CompileError) as exc:
        compile_with_retries(_template(lambda s, p: _ToDouble(s.channels)), V64)
    assert exc.value.reason == "dtype_mismatch"
    with pytest.raises(CompileError) as exc:
        compile_with_retries(CATALOGUE["BP007"], V64)  # conv-only design, vector slot
    assert exc.value.reason == "slot_mismatch"
    with pytest.raises(CompileError) as exc:
        compile_with_retries(CATALOGUE["BP002"], V64, {"no_such_knob": 1.0})
    assert exc.value.reason == "bad_parameters"


class _FlakyOnce(nn.Module):
    """Fails every forward of the first instance built (a transient fault), works afterwards."""

    built = 0

    def __init__(self, c: int) -> None:
        super().__init__()
        type(self).built += 1
        self.broken = type(self).built == 1
        self.lin = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("transient device fault")
        return self.lin(x)


def test_transient_failure_is_retried_conservatively() -> None:
    _FlakyOnce.built = 0
    result = compile_with_retries(_template(lambda s, p: _FlakyOnce(s.channels)), V64)
    assert (result.retries, result.mode) == (1, "conservative")
    _FlakyOnce.built = 0
    with pytest.raises(CompileError) as exc:
        compile_with_retries(_template(lambda s, p: _FlakyOnce(s.channels)), V64, max_attempts=1)
    assert exc.value.reason == "forward_failed"


def _always_broken(slot: SlotShape, params: Mapping[str, float]) -> nn.Module:
    module = _FlakyOnce(slot.channels)
    module.broken = True
    return module


def test_forge_registers_once_then_finds_everything_current(tmp_path: Path) -> None:
    templates = [CATALOGUE["BP001"], CATALOGUE["BP002"], CATALOGUE["BP007"], _template(_always_broken, "TST901")]
    registry = CollectorRegistry()
    metrics = TezzeretMetrics(registry)
    with UrzaLibrary(tmp_path / "catalog.db", tmp_path / "artifacts") as lib:
        first = forge_once(lib, [V64], device=CPU, compile_enabled=False, seed=0, max_attempts=2, metrics=metrics,
                           templates=templates)
        assert sorted(r.kernel_id for r in first.registered) == ["BP001@v64", "BP002@v64"]  # BP007: conv only
        assert first.failed == {"TST901@v64": "forward_failed"}
        second = forge_once(lib, [V64], device=CPU, compile_enabled=False, seed=0, max_attempts=2,
                            templates=templates[:3])
        assert (second.registered, sorted(second.current)) == ([], ["BP001@v64", "BP002@v64"])
        record, data = lib.fetch_artifact(kernel_id("BP002", V64))
        assert load_artifact(data, record.checksum).blueprint_id == "BP002"
        assert [e.descriptor.blueprint_id for e in lib.catalog_entries(include_graph=True)] == ["BP001", "BP002"]
    assert registry.get_sample_value("tezzeret_kernels_registered_total") == 2
    assert registry.get_sample_value("tezzeret_compile_failures_total", {"reason": "forward_failed"}) == 1
    assert registry.get_sample_value("tezzeret_compile_retry_count_total") == 0
