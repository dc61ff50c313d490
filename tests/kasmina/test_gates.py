"""Each gate passes on good input and fails with each of its reason codes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper.karn import SlotShape
from esper.kasmina import (
    GateResult,
    GradientObservation,
    InterfaceProbe,
    gate_g0_sanity,
    gate_g1_gradient_health,
    gate_g2_stability,
    gate_g3_interface,
    gate_g4_system_impact,
    gate_g5_reset,
)
from esper.kasmina.slot import probe_kernel
from esper.leyline import pb


def _failed(result: GateResult, gate: int, reason: str) -> None:
    assert (result.passed, result.gate, result.reason) == (False, gate, reason), result


# -- G0 -----------------------------------------------------------------------------------------------

G0_OK = {"seed_id": "seed-l1", "registered": True, "blueprint_id": "BP002", "parameters": {"alpha": 0.1}}


def test_g0_passes() -> None:
    result = gate_g0_sanity(**G0_OK)  # type: ignore[arg-type]
    assert result.passed and result.name == "G0_SANITY"
    assert gate_g0_sanity(**G0_OK, kernel_finite=True).passed  # type: ignore[arg-type]
    assert gate_g0_sanity(**G0_OK, kernel_id="BP002@v8", expected_kernel_id="BP002@v8").passed  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "reason"), [
    ({"seed_id": " "}, "missing_seed_id"),
    ({"registered": False}, "unknown_seed"),
    ({"blueprint_id": ""}, "missing_blueprint_id"),
    ({"parameters": {"alpha": math.nan}}, "non_finite_parameters"),
    ({"parameters": {"alpha": math.inf}}, "non_finite_parameters"),
    ({"kernel_finite": False}, "non_finite_kernel_parameters"),
    ({"kernel_id": "BP006@v8", "expected_kernel_id": "BP002@v8"}, "kernel_mismatch"),
])
def test_g0_fails(change: dict[str, object], reason: str) -> None:
    _failed(gate_g0_sanity(**{**G0_OK, **change}), pb.SEED_GATE_G0_SANITY, reason)  # type: ignore[arg-type]


# -- G1 -----------------------------------------------------------------------------------------------


def test_g1_passes() -> None:
    assert gate_g1_gradient_health(GradientObservation(True, 0.5, 0.0)).passed
    assert gate_g1_gradient_health(GradientObservation(True, 0.0, 1e-7)).passed  # zero grad is healthy


@pytest.mark.parametrize(("obs", "reason"), [
    (GradientObservation(True, 0.5, 0.0, output_finite=False), "non_finite_output"),
    (GradientObservation(False, 0.0, 0.0, output_finite=False), "non_finite_output"),  # judged first
    (GradientObservation(False, 0.0, 0.0), "no_gradients"),
    (GradientObservation(True, math.nan, 0.0), "non_finite_gradients"),
    (GradientObservation(True, math.inf, 0.0), "non_finite_gradients"),
    (GradientObservation(True, 1e4, 0.0), "gradient_explosion"),
    (GradientObservation(True, 1.0, 2e-6), "isolation_violation"),
    (GradientObservation(True, 1.0, -2e-6), "isolation_violation"),
    (GradientObservation(True, 1.0, math.nan), "isolation_violation"),
    (GradientObservation(True, 1.0, 0.0, 1e-9), "isolation_violation"),  # a dot of 0 hides it: alpha 1
    (GradientObservation(True, 1.0, 0.0, math.nan), "isolation_violation"),
])
def test_g1_fails(obs: GradientObservation, reason: str) -> None:
    _failed(gate_g1_gradient_health(obs, max_grad_norm=1e3), pb.SEED_GATE_G1_GRADIENT_HEALTH, reason)


# -- G2 -----------------------------------------------------------------------------------------------


def test_g2_passes() -> None:
    assert gate_g2_stability(losses=[1.0, 0.9, 0.8, 0.7], latencies_ms=[1.0] * 4, window=4).passed
    assert gate_g2_stability(losses=[0.0] * 4, latencies_ms=[], window=4).passed  # identity seeds start at 0


@pytest.mark.parametrize(("losses", "latencies", "reason"), [
    ([1.0, 1.0], [1.0, 1.0], "insufficient_window"),
    ([1.0, math.nan, 1.0, 1.0], [1.0] * 4, "non_finite_loss"),
    ([1.0, 1.0, 2.5, 3.0], [1.0] * 4, "loss_diverged"),
    ([1.0] * 4, [1.0, 1.0, 1.0, 80.0], "latency_over_budget"),
    ([1.0] * 4, [80.0, math.nan, 1.0, 1.0], "latency_over_budget"),  # a NaN sorts anywhere: not a p95
])
def test_g2_fails(losses: list[float], latencies: list[float], reason: str) -> None:
    result = gate_g2_stability(losses=losses, latencies_ms=latencies, window=4, max_loss_ratio=2.0,
                               latency_budget_ms=50.0)
    _failed(result, pb.SEED_GATE_G2_STABILITY, reason)


@pytest.mark.parametrize(("ratio", "late", "passed"), [
    (2.0, 1.9, True),  # late-half mean 1.9 <= 2 x early-half mean 1.0
    (2.0, 2.1, False),  # 2.1 > 2 x 1.0
    (3.0, 2.9, True),  # the ratio is the setting's, not a constant
    (3.0, 3.1, False),
])
def test_g2_allows_a_rise_up_to_max_loss_ratio(ratio: float, late: float, passed: bool) -> None:
    result = gate_g2_stability(losses=[1.0, 1.0, late, late], latencies_ms=[1.0] * 4, window=4,
                               max_loss_ratio=ratio)
    if passed:
        assert result.passed, result
    else:
        _failed(result, pb.SEED_GATE_G2_STABILITY, "loss_diverged")


# -- G3 -----------------------------------------------------------------------------------------------

PROBE_OK = InterfaceProbe((2, 8), "torch.float32", (2, 8), "torch.float32", True)


def test_g3_passes() -> None:
    assert gate_g3_interface(PROBE_OK, required_layers=["fc1"], host_layers={"fc1", "hidden"}, blend_mode="RESIDUAL",
                             allowed_blend_modes=("CONVEX", "RESIDUAL")).passed


@pytest.mark.parametrize(("probe", "required", "mode", "reason"), [
    (InterfaceProbe((2, 8), "torch.float32", (2, 4), "torch.float32", True), (), "CONVEX", "shape_mismatch"),
    (InterfaceProbe((2, 8), "torch.float32", (2, 8), "torch.float64", True), (), "CONVEX", "dtype_mismatch"),
    (InterfaceProbe((2, 8), "torch.float32", (2, 8), "torch.float32", False), (), "CONVEX", "non_finite_output"),
    (PROBE_OK, ("fc1", "fc9"), "CONVEX", "mesh_coverage_missing"),
    (PROBE_OK, (), "RESIDUAL", "blend_mode_not_allowed"),
    (InterfaceProbe((2, 8), "torch.float32", (), "", False, error="RuntimeError: mat1 and mat2"), (), "CONVEX",
     "probe_failed"),
])
def test_g3_fails(probe: InterfaceProbe, required: tuple[str, ...], mode: str, reason: str) -> None:
    result = gate_g3_interface(probe, required_layers=required, host_layers={"fc1", "hidden"}, blend_mode=mode,
                               allowed_blend_modes=("CONVEX",))
    _failed(result, pb.SEED_GATE_G3_INTERFACE, reason)
    if reason == "mesh_coverage_missing":
        assert result.detail == "fc9"


# -- G4 -----------------------------------------------------------------------------------------------


def test_g4_passes() -> None:
    assert gate_g4_system_impact(performance_status="nominal", baseline_loss=1.0, observed_loss=1.05).passed
    assert gate_g4_system_impact(performance_status="healthy", check_regression=False).passed


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"performance_status": "fallback", "baseline_loss": 1.0, "observed_loss": 0.5}, "fallback_status_rejected"),
    ({"performance_status": "FALLBACK", "check_regression": False}, "fallback_status_rejected"),
    ({"performance_status": "nominal", "baseline_loss": 1.0, "observed_loss": 1.0, "isolation_violations": 1},
     "isolation_violations"),
    ({"performance_status": "nominal", "baseline_loss": None, "observed_loss": 1.0}, "missing_loss_signal"),
    ({"performance_status": "nominal", "baseline_loss": 1.0, "observed_loss": 1.2}, "loss_regression"),
    ({"performance_status": "nominal", "baseline_loss": 1.0, "observed_loss": math.inf}, "loss_regression"),
])
def test_g4_fails(kwargs: dict[str, object], reason: str) -> None:
    _failed(gate_g4_system_impact(**kwargs), pb.SEED_GATE_G4_SYSTEM_IMPACT, reason)  # type: ignore[arg-type]


# -- G5 -----------------------------------------------------------------------------------------------


def test_g5_passes() -> None:
    assert gate_g5_reset(kernel_attached=False, optimizer_params_left=0, hooks_left=0).passed


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"kernel_attached": True, "optimizer_params_left": 0, "hooks_left": 0}, "kernel_still_attached"),
    ({"kernel_attached": False, "optimizer_params_left": 2, "hooks_left": 0}, "optimizer_state_left"),
    ({"kernel_attached": False, "optimizer_params_left": 0, "hooks_left": 1}, "hooks_left"),
])
def test_g5_fails(kwargs: dict[str, int | bool], reason: str) -> None:
    _failed(gate_g5_reset(**kwargs), pb.SEED_GATE_G5_RESET, reason)  # type: ignore[arg-type]


# -- the G3 probe -------------------------------------------------------------------------------------


def test_probe_kernel_feeds_g3() -> None:
    slot, cpu = SlotShape(8), torch.device("cpu")
    linear = nn.Linear(8, 8)
    rng = torch.get_rng_state()
    fits = probe_kernel(linear, slot, dtype=torch.float32, device=cpu)
    assert gate_g3_interface(fits).passed and torch.equal(rng, torch.get_rng_state())  # trainer RNG untouched
    narrow = probe_kernel(nn.Linear(8, 4), slot, dtype=torch.float32, device=cpu)
    assert gate_g3_interface(narrow).reason == "shape_mismatch"
    broken = probe_kernel(nn.Linear(5, 5), slot, dtype=torch.float32, device=cpu)
    assert gate_g3_interface(broken).reason == "probe_failed" and "RuntimeError" in broken.error
    assert gate_g3_interface(probe_kernel(nn.Linear(8, 8), slot, dtype=torch.float64, device=cpu)).reason == \
        "probe_failed"  # a float64 host with float32 weights would crash the real forward
    assert gate_g3_interface(probe_kernel(nn.Linear(8, 8), slot, dtype=torch.bfloat16, device=cpu)).passed  # AMP
    kernel = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    kernel.train()
    probe_kernel(kernel, slot, dtype=torch.float32, device=cpu)
    assert kernel.training  # mode restored
