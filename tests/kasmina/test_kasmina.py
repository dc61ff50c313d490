"""The executor on a tiny host with real Karn kernels (built through the artifact path, no bus): stage
progression, each gate failing in place and culling with `gate_failure`, PAUSE, ablation, evidence,
optimizer bookkeeping and the exported SeedState/telemetry."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import pytest
import torch

from esper.karn import SlotShape
from esper.kasmina import FetchedKernel, Kasmina, KasminaSettings
from esper.kasmina.errors import KernelFetchError
from esper.kasmina.optim import SEED_GROUP_KEY, seed_group
from esper.leyline import pb
from tests.kasmina._helpers import (
    KEYS,
    SEED,
    KarnKernelSource,
    TinyHost,
    clock,
    command,
    data,
    events,
    fast_settings,
    train_step,
)

S = pb


class Rig:
    """A host, its optimizer and Kasmina, stepping on a fixed batch."""

    def __init__(self, settings: KasminaSettings | None = None, source: KarnKernelSource | None = None) -> None:
        torch.manual_seed(0)
        self.model = TinyHost()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.source = source or KarnKernelSource()
        self.k = Kasmina(keys=KEYS, settings=settings or fast_settings(), kernels=self.source, optimizer=self.opt,
                         clock_ms=clock)
        self.k.register_host(self.model)
        self.batch = data()
        self.i = 0

    async def germinate(self, **kw: object) -> None:
        assert self.k.apply_command(command(**kw)).kernel_pending  # type: ignore[arg-type]
        assert self.k.pending_kernels() == [SEED]
        assert await self.k.fetch_kernels() == 1

    def step(self, n: int = 1, **kw: object) -> None:
        for _ in range(n):
            self.i += 1
            train_step(self.model, self.k, self.opt, self.batch, self.i, **kw)  # type: ignore[arg-type]

    def until(self, stage: int, limit: int = 60, **kw: object) -> None:
        for _ in range(limit):
            if self.k.stage(SEED) == stage:
                return
            self.step(**kw)
        raise AssertionError(f"never reached {stage}; at {self.k.stage(SEED)}")

    @property
    def stages(self) -> list[int]:
        return [t.to_stage for t in self.k.history(SEED)]


def _names(evs: list[Mapping[str, str]]) -> list[str]:
    return [e["event"] for e in evs]


async def test_full_path_to_fossilized() -> None:
    rig = Rig()
    await rig.germinate(annotations={"blend_mode": "CONVEX", "blending_method": "linear"},
                        params={"alpha": 0.0, "blending_schedule_start": 0.0, "blending_schedule_end": 1.0})
    assert rig.k.stage(SEED) == S.SEED_STAGE_GERMINATED and rig.model.slot.seed is None
    rig.step()  # attach at this boundary
    assert rig.model.slot.seed is not None and rig.model.slot.mode == "train"
    group = seed_group(rig.opt, SEED)
    assert group is not None and group["lr"] == 0.05 and group["momentum"] == 0.9
    rig.until(S.SEED_STAGE_BLENDING)
    alphas = []
    while rig.k.stage(SEED) == S.SEED_STAGE_BLENDING:
        alphas.append(rig.model.slot.alpha)
        rig.step()
    assert alphas == pytest.approx([0.0, 0.25, 0.5, 0.75])  # linear over 4 steps
    assert rig.k.stage(SEED) == S.SEED_STAGE_SHADOWING and rig.model.slot.alpha == 1.0
    rig.until(S.SEED_STAGE_PROBATIONARY)
    x, y = rig.batch
    rig.model.eval()
    with torch.no_grad():
        with_seed = float(torch.nn.functional.cross_entropy(rig.model(x), y))
        with rig.k.ablated(SEED):
            without = float(torch.nn.functional.cross_entropy(rig.model(x), y))
    assert with_seed != without
    assert rig.k.report_evidence(SEED, loss_with=0.40, loss_without=0.55)  # the "evidence" input
    rig.until(S.SEED_STAGE_FOSSILIZED)
    assert rig.stages == [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING,
                          S.SEED_STAGE_SHADOWING, S.SEED_STAGE_PROBATIONARY, S.SEED_STAGE_FOSSILIZED]
    assert rig.model.slot.mode == "fossil" and rig.model.slot.hooks == 0
    fossil = seed_group(rig.opt, SEED)
    assert fossil is not None and fossil.get("kasmina_fossil") == SEED
    evs = events(rig.k)
    assert [e["gate"] for e in evs if e["event"] == "gate_event"] == ["G0_SANITY", "G3_INTERFACE", "G1_GRADIENT_HEALTH",
                                                                      "G2_STABILITY", "G3_INTERFACE",
                                                                      "G4_SYSTEM_IMPACT"]
    assert "seed_fossilized" in _names(evs) and "gate_failure" not in _names(evs)
    rig.step(3)  # the fossil keeps training as part of the host
    assert rig.k.stage(SEED) == S.SEED_STAGE_FOSSILIZED
    with pytest.raises(Exception, match="illegal"):
        rig.k.apply_command(command())  # a fossil slot never hosts another seed
    rig.k.retire(SEED)
    assert rig.k.stage(SEED) == S.SEED_STAGE_TERMINATED


def _refused_nan_step(rig: Rig) -> None:
    """What the trainer does with a batch whose loss is NaN: forward and backward, then no optimizer
    step and no `advance` (the step is refused)."""
    x, y = rig.batch
    bad = x.clone()
    bad[0, 0] = float("nan")
    rig.opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(rig.model(bad), y)
    extra = rig.k.auxiliary_loss()
    assert extra is not None and not torch.isfinite(loss)
    (loss + extra).backward()
    rig.opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("discard", [True, False])
async def test_a_refused_step_leaves_nothing_in_the_seeds_observations(discard: bool) -> None:
    """A NaN batch the trainer refuses: its seed observations (isolation norms, local loss, latency)
    used to be merged into the next step's, so Kasmina's isolation telemetry read NaN."""
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_TRAINING)
    _refused_nan_step(rig)
    if discard:
        rig.k.discard_step()  # what the trainer's refusal does
    rig.step()
    host_norm = next(m.value for m in rig.k.metrics() if m.name == "kasmina.seed.isolation.host_norm")
    if discard:
        assert math.isfinite(host_norm) and host_norm > 0
    else:  # the control: what the trainer published before it discarded the refused step
        assert math.isnan(host_norm)


def _tolaria_step(rig: Rig, x: torch.Tensor | None = None) -> float:
    """Tolaria's step: a non-finite loss or gradient norm is refused (no optimizer step, `discard_step`,
    no `advance`); otherwise applied and advanced. Returns the task loss."""
    x, y = rig.batch if x is None else (x, rig.batch[1])
    rig.model.train()
    rig.opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(rig.model(x), y)
    extra = rig.k.auxiliary_loss()
    (loss if extra is None else loss + extra).backward()
    grads = [p.grad.detach().float().pow(2).sum() for g in rig.opt.param_groups for p in g["params"]
             if p.grad is not None]
    rig.i += 1
    if not (math.isfinite(loss.item()) and math.isfinite(float(torch.stack(grads).sum()))):
        rig.opt.zero_grad(set_to_none=True)
        rig.k.discard_step()
    else:
        rig.opt.step()
        rig.k.advance(rig.i, loss=loss.item())
    return loss.item()


@pytest.mark.parametrize("weight", ["zero", "blended"])
async def test_a_seed_whose_output_goes_non_finite_is_culled_by_g1(weight: str) -> None:
    """A seed that overflows on finite input: blended in, every step it runs in is non-finite and
    refused, so `advance` never ran and the seed was never culled. At weight 0 it harms nothing (the
    host's output is exact, the step is applied) until its weight rises: that first step is refused,
    and the refusal culls it."""
    rig = Rig()
    # linear from alpha 0 with the ramp at the window's very end: alpha stays exactly 0 while BLENDING
    params = {"alpha": 0.0, "blending_schedule_start": 1.0, "blending_schedule_end": 1.0}
    await rig.germinate(annotations={"blending_method": "linear"}, params=params)
    rig.until(S.SEED_STAGE_BLENDING if weight == "zero" else S.SEED_STAGE_SHADOWING)
    assert rig.model.slot.alpha == (0.0 if weight == "zero" else 1.0)
    nan_batch = rig.batch[0].clone()
    nan_batch[0, 0] = math.nan
    assert math.isnan(_tolaria_step(rig, nan_batch))  # a NaN *batch* is not the seed's fault: it stays
    assert rig.model.slot.seed is not None
    events(rig.k)
    with torch.no_grad():
        for p in rig.model.slot.seed.parameters():
            p.mul_(1e38)  # finite weights whose output overflows
    loss = _tolaria_step(rig)
    if weight == "zero":
        assert math.isfinite(loss) and rig.model.slot.seed is not None  # not mixed in: nothing to refuse
        rig.model.slot.alpha = 0.25  # the ramp's next value
        loss = _tolaria_step(rig)
    assert math.isnan(loss)
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    assert seed_group(rig.opt, SEED) is None
    evs = events(rig.k)
    assert [(e["gate"], e["reason"]) for e in evs if e["event"] == "gate_failure"] == [
        ("G1_GRADIENT_HEALTH", "non_finite_output")]
    assert [e["reason"] for e in evs if e["event"] == "seed_culled"] == ["gate_g1"]
    assert math.isfinite(_tolaria_step(rig))  # the host trains on alone


@pytest.mark.parametrize("outcome", ["ready", "failed"])
async def test_a_fetch_outcome_for_an_earlier_germination_is_never_used(outcome: str) -> None:
    """The bus thread's write of a finished fetch can land after the trainer re-germinated the slot: the
    boundary neither attaches that kernel nor culls the new seed for that failure; it fetches again."""
    rig = Rig()
    await rig.germinate()
    rec = rig.k._records[SEED]
    assert rec.fetch_state == "ready" and rec.fetched is not None and rec.fetch_generation == rec.generation
    if outcome == "failed":
        rec.fetched, rec.fetch_error, rec.fetch_state = None, KernelFetchError("timeout"), "failed"
    rec.generation += 1  # what a re-germination between the fetch's generation check and its write leaves
    rig.step()
    assert rig.model.slot.seed is None and rec.fetched is None and rec.fetch_error is None
    assert rig.k.stage(SEED) == S.SEED_STAGE_GERMINATED and rig.k.pending_kernels() == [SEED]


async def test_no_benefit_culls_back_to_dormant() -> None:
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_PROBATIONARY)
    assert rig.k.report_evidence(SEED, loss_with=0.6, loss_without=0.5)
    rig.k.advance(rig.i + 1, loss=0.5)  # evaluation-only boundaries do not move the seed's clock...
    assert rig.k.stage(SEED) == S.SEED_STAGE_PROBATIONARY
    rig.step(2)  # ...training steps do
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    assert rig.model.slot.seed is None and seed_group(rig.opt, SEED) is None
    assert all(SEED_GROUP_KEY not in g for g in rig.opt.param_groups)
    rig.step(4)
    assert rig.k.stage(SEED) == S.SEED_STAGE_DORMANT
    assert rig.stages[-4:] == [S.SEED_STAGE_CULLED, S.SEED_STAGE_EMBARGOED, S.SEED_STAGE_RESETTING,
                               S.SEED_STAGE_DORMANT]
    assert _names(events(rig.k)).count("rollback_ready") == 1
    await rig.germinate()  # the slot is usable again
    rig.step()
    assert rig.model.slot.seed is not None


async def test_cull_keeps_host_momentum() -> None:
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_BLENDING)
    host = {n: p for n, p in rig.model.named_parameters() if not n.startswith("slot.")}
    before = {n: rig.opt.state[p]["momentum_buffer"].clone() for n, p in host.items()}
    seed_params = list(rig.model.slot.seed.parameters())  # type: ignore[union-attr]
    assert all(p in rig.opt.state for p in seed_params)
    rig.k.apply_command(command(op=pb.SEED_OP_CULL))
    assert all(torch.equal(rig.opt.state[p]["momentum_buffer"], before[n]) for n, p in host.items())
    assert all(p not in rig.opt.state for p in seed_params) and len(rig.opt.param_groups) == 1


async def _cull_reason(rig: Rig, *, until: int = 40, **kw: object) -> tuple[str, str]:
    for _ in range(until):
        if rig.k.stage(SEED) == S.SEED_STAGE_CULLED:
            break
        rig.step(**kw)
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED, rig.k.stage(SEED)
    failures = [e for e in events(rig.k) if e["event"] == "gate_failure"]
    assert len(failures) == 1 and rig.model.slot.seed is None and seed_group(rig.opt, SEED) is None
    return failures[0]["gate"], failures[0]["reason"]


async def test_g1_no_gradients_when_the_trainer_ignores_the_local_loss() -> None:
    rig = Rig()
    await rig.germinate()
    assert await _cull_reason(rig, aux=False) == ("G1_GRADIENT_HEALTH", "no_gradients")


async def test_g1_isolation_violation_culls_with_a_high_priority_event() -> None:
    rig = Rig()
    await rig.germinate(blueprint="BP002")
    rig.step()
    rig.model.slot.leak_gradients = True
    rig.model.slot.seed.fc2.weight.data.normal_()  # type: ignore[union-attr]  # make the leak carry gradient
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED  # on the first leaking step
    evs = events(rig.k)
    violation = [e for e in evs if e["event"] == "isolation_violation"]
    assert len(violation) == 1 and violation[0]["_level"] == str(pb.TELEMETRY_LEVEL_WARNING)
    assert [(e["gate"], e["reason"]) for e in evs if e["event"] == "gate_failure"] == [
        ("G1_GRADIENT_HEALTH", "isolation_violation")]
    assert {s.seed_id: s for s in rig.k.seed_states()}[SEED].metrics["isolation_violations"] == 1.0


async def test_a_new_seed_in_the_slot_starts_with_no_isolation_violations() -> None:
    """The count is per seed: the culled seed's violation stays visible until the slot's next seed, which
    used to inherit it; the global metric keeps every seed's."""
    rig = Rig()
    await rig.germinate(blueprint="BP002")
    rig.step()
    rig.model.slot.leak_gradients = True
    rig.model.slot.seed.fc2.weight.data.normal_()  # type: ignore[union-attr]
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    rig.model.slot.leak_gradients = False
    rig.until(S.SEED_STAGE_DORMANT)
    assert rig.k.seed_states()[0].metrics["isolation_violations"] == 1.0
    await rig.germinate(blueprint="BP002")
    rig.step(2)
    assert rig.k.stage(SEED) == S.SEED_STAGE_TRAINING
    metrics = {m.name: m.value for m in rig.k.metrics()}
    assert rig.k.seed_states()[0].metrics["isolation_violations"] == 0.0
    assert metrics["kasmina.seed.isolation_violations"] == 0.0 and metrics["kasmina.isolation.violations"] == 1.0


async def test_g2_latency_over_budget() -> None:
    rig = Rig(fast_settings(latency_budget_ms=1e-9))
    await rig.germinate()
    assert await _cull_reason(rig) == ("G2_STABILITY", "latency_over_budget")


async def test_g3_mesh_coverage_missing_at_attach() -> None:
    rig = Rig()
    await rig.germinate(annotations={"mesh_host_layers": '["fc1", "decoder.7"]'})
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    evs = events(rig.k)
    assert [(e["gate"], e["reason"]) for e in evs if e["event"] == "gate_failure"] == [
        ("G3_INTERFACE", "mesh_coverage_missing")]
    assert [e["missing"] for e in evs if e["event"] == "mesh_coverage_missing"] == ["decoder.7"]


async def test_g3_mesh_coverage_met() -> None:
    rig = Rig()
    await rig.germinate(annotations={"mesh_host_layers": "fc1,hidden"})
    rig.step()
    assert rig.model.slot.seed is not None


async def test_g3_blend_mode_not_allowed_by_the_blueprint() -> None:
    rig = Rig()
    await rig.germinate(blueprint="BP006", annotations={"blend_mode": "RESIDUAL"})  # SE allows CONVEX only
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    assert [(e["gate"], e["reason"]) for e in events(rig.k) if e["event"] == "gate_failure"] == [
        ("G3_INTERFACE", "blend_mode_not_allowed")]


async def test_g4_fallback_status_is_terminal() -> None:
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_BLENDING)
    rig.k.set_performance_status(SEED, "fallback")
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    evs = events(rig.k)
    assert [(e["gate"], e["reason"]) for e in evs if e["event"] == "gate_failure"] == [
        ("G4_SYSTEM_IMPACT", "fallback_status_rejected")]
    critical = [e for e in evs if e["event"] == "fallback_status_rejected"]
    assert len(critical) == 1 and critical[0]["_level"] == str(pb.TELEMETRY_LEVEL_CRITICAL)


async def test_g4_fallback_annotation_on_the_command() -> None:
    rig = Rig()
    await rig.germinate(annotations={"performance_status": "fallback"})
    rig.step(2)
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED


async def test_g4_missing_loss_signal() -> None:
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_SHADOWING)
    rig.step(2, report_loss=False)  # the trainer stopped reporting its loss to advance()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    assert [e["reason"] for e in events(rig.k) if e["event"] == "gate_failure"] == ["missing_loss_signal"]


async def test_g4_loss_regression() -> None:
    rig = Rig(fast_settings(regression_tolerance=0.0))
    await rig.germinate()
    rig.until(S.SEED_STAGE_SHADOWING)
    x, y = rig.batch
    for _ in range(2):
        rig.i += 1
        rig.opt.zero_grad()
        torch.nn.functional.cross_entropy(rig.model(x), y).backward()
        rig.opt.step()
        rig.k.advance(rig.i, loss=100.0)  # far above anything the host reported before
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    assert [e["reason"] for e in events(rig.k) if e["event"] == "gate_failure"] == ["loss_regression"]


def _paused_easy_steps(rig: Rig, easy: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A PAUSE mid-shadow, then paused steps on easy batches, each reported (as a careless caller
    would) and then refused or counted nowhere: none of them may enter G4's pairs."""
    assert rig.k.apply_command(command(pb.COMMAND_PAUSE)).action == "paused"
    assert rig.k.shadowing() == []  # paused: no report asked for
    for _ in range(3):
        rig.i += 1
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(rig.model(easy[0]), easy[1]))
        assert rig.k.report_shadow(SEED, loss_without=loss * 0.5)  # a wrong report that must not stick
        rig.k.advance(rig.i, loss=loss)
    rig.k.report_shadow(SEED, loss_without=0.0)
    rig.k.discard_step()  # a refused step's report is dropped too


def _shadow_on_harder_data(rig: Rig, *, paired: bool,
                           pause_on: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Frozen host and seed (lr 0): TRAINING on the easy batch, then BLENDING and SHADOWING on a batch of
    the host's least likely labels. The seed changes the loss by well under G4's tolerance there; only
    the data got harder."""
    x, _ = rig.batch
    with torch.no_grad():
        hard = (x, rig.model(x).argmin(1))
    for group in rig.opt.param_groups:
        group["lr"] = 0.0
    rig.until(S.SEED_STAGE_BLENDING)
    while rig.k.stage(SEED) in (S.SEED_STAGE_BLENDING, S.SEED_STAGE_SHADOWING):
        rig.i += 1
        rig.opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(rig.model(hard[0]), hard[1])
        loss.backward()
        if paired and rig.k.shadowing():
            with torch.no_grad(), rig.k.ablated(SEED):
                without = float(torch.nn.functional.cross_entropy(rig.model(hard[0]), hard[1]))
            assert abs(loss.item() - without) < 0.05 * without  # the seed's own effect: small
            assert rig.k.report_shadow(SEED, loss_without=without)
            if pause_on is not None:  # once, after the first shadow step's report
                _paused_easy_steps(rig, pause_on)
                pause_on = None
        rig.opt.step()
        rig.k.advance(rig.i, loss=loss.item())


async def test_g4_compares_the_same_batches_with_and_without_the_seed() -> None:
    """Against the TRAINING-stage losses (other, easier batches) the harder data read as the seed's
    regression and culled it; paired with the same batches' ablated losses it passes."""
    rig = Rig(fast_settings(regression_tolerance=0.1, shadow_steps=4))
    await rig.germinate()
    _shadow_on_harder_data(rig, paired=True, pause_on=rig.batch)
    assert rig.k.stage(SEED) == S.SEED_STAGE_PROBATIONARY
    evs = events(rig.k)
    assert not [e for e in evs if e["event"] == "gate_failure"]
    [g4] = [e for e in evs if e["event"] == "gate_event" and e["gate"] == "G4_SYSTEM_IMPACT"]
    assert (g4["baseline"], g4["steps"]) == ("paired", "4")  # the four counted shadow steps, paired by step
    assert not rig.k.report_shadow(SEED, loss_without=1.0)  # outside SHADOWING: ignored

    unpaired = Rig(fast_settings(regression_tolerance=0.1))
    await unpaired.germinate()
    _shadow_on_harder_data(unpaired, paired=False)  # a caller that does not measure: the old baseline
    assert [e["reason"] for e in events(unpaired.k) if e["event"] == "gate_failure"] == ["loss_regression"]


async def test_g5_failure_retires_the_slot() -> None:
    rig = Rig(fast_settings(embargo_steps=0))
    await rig.germinate()
    rig.step()
    rig.k.apply_command(command(op=pb.SEED_OP_CULL))
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    from esper.kasmina import add_seed_params

    add_seed_params(rig.opt, SEED, [torch.nn.Parameter(torch.zeros(2))])  # state left behind on purpose
    rig.step(3)
    assert rig.k.stage(SEED) == S.SEED_STAGE_TERMINATED
    assert [(e["gate"], e["reason"]) for e in events(rig.k) if e["event"] == "gate_failure"] == [
        ("G5_RESET", "optimizer_state_left")]


async def test_kernel_fetch_failure_fails_the_germination() -> None:
    rig = Rig(source=KarnKernelSource(fail="timeout"))
    await rig.germinate()
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    failed = [e for e in events(rig.k) if e["event"] == "germination_failed"]
    assert [e["reason"] for e in failed] == ["timeout"]
    rig.step(4)
    assert rig.k.stage(SEED) == S.SEED_STAGE_DORMANT


@pytest.mark.parametrize("failure", ["artifact_not_found", "timeout"])
async def test_a_failed_kernel_fetch_is_a_g4_fallback_rejection(failure: str) -> None:
    """No kernel means the seed could only run on a substitute: G4 rejects that (terminal), through the
    gate path (`gate_failure` + CRITICAL `fallback_status_rejected`), and nothing is ever attached."""
    rig = Rig(source=KarnKernelSource(fail=failure))
    await rig.germinate()
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    evs = events(rig.k)
    gate = [e for e in evs if e["event"] == "gate_failure"]
    assert [(e["gate"], e["reason"], e["fetch_reason"], e["seed_id"]) for e in gate] == [
        ("G4_SYSTEM_IMPACT", "fallback_status_rejected", failure, SEED)]
    critical = [e for e in evs if e["event"] == "fallback_status_rejected"]
    assert [(e["seed_id"], e["_level"]) for e in critical] == [(SEED, str(pb.TELEMETRY_LEVEL_CRITICAL))]
    assert [e["reason"] for e in evs if e["event"] == "germination_failed"] == [failure]
    assert [e["reason"] for e in evs if e["event"] == "seed_culled"] == [f"kernel_{failure}"]
    rig.step(4)  # through the embargo to DORMANT: no substitute kernel at any boundary
    assert rig.k.stage(SEED) == S.SEED_STAGE_DORMANT and rig.model.slot.seed is None
    assert all(e["event"] != "kernel_attached" for e in evs + events(rig.k)) and seed_group(rig.opt, SEED) is None


class _OtherBlueprintSource(KarnKernelSource):
    """Answers every fetch with BP006's kernel, checksum and all: the bytes verify, the identity does not."""

    async def fetch(self, blueprint_id: str, slot: SlotShape, *, device: torch.device) -> FetchedKernel:
        return await super().fetch("BP006", slot, device=device)


async def test_a_kernel_that_is_not_the_commanded_blueprint_fails_g0_and_is_never_attached() -> None:
    rig = Rig(source=_OtherBlueprintSource())
    await rig.germinate(blueprint="BP002")
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    evs = events(rig.k)
    [gate] = [e for e in evs if e["event"] == "gate_failure"]
    assert (gate["gate"], gate["reason"]) == ("G0_SANITY", "kernel_mismatch")
    assert all(e["event"] != "kernel_attached" for e in evs) and seed_group(rig.opt, SEED) is None


class _HangingSource(KarnKernelSource):
    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()

    async def fetch(self, blueprint_id: str, slot: SlotShape, *, device: torch.device) -> FetchedKernel:
        self.entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.parametrize("inside_fetch", [False, True])
async def test_a_cancelled_kernel_fetch_fails_its_germination_explicitly(inside_fetch: bool) -> None:
    """A cancelled fetch (shutdown, or the prefetch task cancelled) stayed "in flight" for good: nothing
    retried it and the seed sat in GERMINATED without a word. It is a failed fetch like any other,
    whether the cancel lands inside the fetch or before the per-seed fetches began."""
    source = _HangingSource()
    rig = Rig(source=source)
    rig.k.apply_command(command())
    task = rig.k.start_prefetch()
    assert task is not None
    if inside_fetch:
        await source.entered.wait()
    else:
        await asyncio.sleep(0)  # fetch_kernels ran to its gather; the per-seed fetches have not started
        assert not source.entered.is_set()
    assert rig.k.pending_kernels() == []  # in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rig.step()
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    evs = events(rig.k)
    assert [e["reason"] for e in evs if e["event"] == "germination_failed"] == ["cancelled"]
    assert [e["reason"] for e in evs if e["event"] == "seed_culled"] == ["kernel_cancelled"]


def test_kernel_breaker_transitions_are_breaker_events() -> None:
    """The prototype's `breaker_event`: the kernel-fetch breaker opening (WARNING) and closing again."""
    from esper.core.breaker import CircuitBreaker

    rig = Rig()
    now = [0.0]
    breaker = CircuitBreaker("kernel_fetch", failure_threshold=2, success_threshold=1, reset_timeout_s=5.0,
                             clock=lambda: now[0], on_transition=rig.k.breaker_transition)
    breaker.record_failure()
    breaker.record_failure()
    now[0] = 6.0
    assert breaker.allow()  # HALF_OPEN: a probe
    breaker.record_success()
    got = [(e["breaker"], e["from_state"], e["to_state"], e["_level"]) for e in events(rig.k, "breaker_event")]
    assert got == [("kernel_fetch", "CIRCUIT_STATE_CLOSED", "CIRCUIT_STATE_OPEN", str(pb.TELEMETRY_LEVEL_WARNING)),
                   ("kernel_fetch", "CIRCUIT_STATE_OPEN", "CIRCUIT_STATE_HALF_OPEN", str(pb.TELEMETRY_LEVEL_INFO)),
                   ("kernel_fetch", "CIRCUIT_STATE_HALF_OPEN", "CIRCUIT_STATE_CLOSED", str(pb.TELEMETRY_LEVEL_INFO))]


async def test_cull_before_the_kernel_arrives_drops_it() -> None:
    rig = Rig()
    rig.k.apply_command(command())
    rig.k.apply_command(command(op=pb.SEED_OP_CANCEL))
    assert await rig.k.fetch_kernels() == 0 and rig.source.fetches == 0
    rig.step()
    assert rig.model.slot.seed is None


async def test_pause_holds_the_clock_and_resume_releases_it() -> None:
    rig = Rig(fast_settings(training_steps=2))
    await rig.germinate()
    rig.until(S.SEED_STAGE_TRAINING)
    assert rig.k.apply_command(command(pb.COMMAND_PAUSE)).action == "paused"
    rig.step(5)
    assert rig.k.stage(SEED) == S.SEED_STAGE_TRAINING
    assert {s.seed_id: s for s in rig.k.seed_states()}[SEED].metrics["paused"] == 1.0
    assert rig.k.apply_command(command(pb.COMMAND_PAUSE, annotations={"resume": "true"})).action == "resumed"
    rig.step(2)
    assert rig.k.stage(SEED) == S.SEED_STAGE_BLENDING
    # a PAUSE naming a dormant seed (Tamiyo's risk engine replacing a GERMINATE) changes nothing
    rig2 = Rig()
    assert rig2.k.apply_command(command(pb.COMMAND_PAUSE)).action == "acknowledged"


async def test_channel_and_confidence_blending_in_the_slot() -> None:
    rig = Rig()
    await rig.germinate(annotations={"blend_mode": "CHANNEL", "alpha_vec": "[1,1,1,1,0,0,0,0]"})
    rig.until(S.SEED_STAGE_SHADOWING)
    x = torch.randn(5, 8)
    slot = rig.model.slot
    slot.eval()
    with torch.no_grad():
        out, seed_out = slot(x), slot.seed(x)  # type: ignore[misc]
    assert torch.allclose(out[:, :4], seed_out[:, :4]) and torch.equal(out[:, 4:], x[:, 4:])

    rig2 = Rig()
    await rig2.germinate(annotations={"blend_mode": "CONFIDENCE", "confidence_logits": "[3.0, 1.0]",
                                      "gate_k": "1", "gate_tau": "0", "alpha_hi": "0.5"})
    rig2.until(S.SEED_STAGE_SHADOWING)
    state = {s.seed_id: s for s in rig2.k.seed_states()}[SEED]
    assert state.metrics["alpha"] == pytest.approx(0.5)  # sigmoid(2) = 0.88, clamped to alpha_hi


def _alphas(rig: Rig) -> tuple[float, float]:
    """(SeedState alpha, the kasmina.seed.alpha metric)."""
    (state,) = rig.k.seed_states()
    return state.metrics["alpha"], next(m.value for m in rig.k.metrics() if m.name == "kasmina.seed.alpha")


async def test_exported_alpha_is_the_weight_the_slot_applies() -> None:
    """0 until the slot blends (a TRAINING seed's output is the host's); CHANNEL: the mean per-channel
    weight; the metric the same number."""
    rig = Rig()
    await rig.germinate(annotations={"blend_mode": "CHANNEL", "alpha_vec": "[1,0.5,0.25,0,0,0,0,0.25]"})
    rig.until(S.SEED_STAGE_TRAINING)
    assert _alphas(rig) == (0.0, 0.0)
    rig.until(S.SEED_STAGE_SHADOWING)  # alpha 1: weights [1, .5, .25, 0, 0, 0, 0, .25], mean 2/8
    assert _alphas(rig) == (0.25, 0.25)

    rig2 = Rig()
    await rig2.germinate(annotations={"blend_mode": "CONFIDENCE", "confidence_logits": "[2.0, 1.0]",
                                      "alpha_lo": "0.3"})
    rig2.until(S.SEED_STAGE_TRAINING)
    assert _alphas(rig2) == (0.0, 0.0)  # alpha_lo applies to a blend, and there is none yet
    rig2.until(S.SEED_STAGE_SHADOWING)  # alpha 1 · sigmoid(4·(2 - 1 - 0.2)), within [0.3, 1]
    gate = 1.0 / (1.0 + math.exp(-3.2))
    exported, metric = _alphas(rig2)
    assert exported == pytest.approx(gate, abs=1e-6) and metric == pytest.approx(gate, abs=1e-6)


async def test_seed_state_and_telemetry_export() -> None:
    rig = Rig()
    (dormant,) = rig.k.seed_states()
    assert (dormant.seed_id, dormant.stage, dormant.layer_depth) == (SEED, S.SEED_STAGE_DORMANT, 1)
    assert dormant.metrics["kernel_attached"] == 0.0 and dormant.metrics["blend_allowed"] == 0.0
    await rig.germinate(annotations={"blend_mode": "RESIDUAL", "blending_method": "warmup_hold"})
    rig.until(S.SEED_STAGE_BLENDING)
    rig.step()
    (state,) = rig.k.seed_states()
    m = state.metrics
    assert state.stage == S.SEED_STAGE_BLENDING and state.risk_score == pytest.approx(0.1)  # BP002's risk
    assert state.learning_rate == pytest.approx(0.05) and state.gradient_norm > 0
    assert m["kernel_attached"] == 1.0 and m["alpha_steps"] == 1.0 and m["alpha_total_steps"] == 4.0
    assert m["blend_mode_index"] == 1.0 and m["alpha_schedule_index"] == 3.0  # RESIDUAL, warmup_hold
    assert m["blend_method.CONVEX"] == m["blend_method.RESIDUAL"] == m["blend_method.CHANNEL"] == 1.0
    assert m["blend_allowed"] == 1.0 and m["isolation_dot"] == 0.0 and 0 < m["alpha"] < 1
    packet = rig.k.telemetry_packet()
    assert packet.source_subsystem == "kasmina" and packet.events
    names = {p.name for p in packet.metrics}
    assert {"kasmina.seed.stage", "kasmina.seed.alpha", "kasmina.seed.isolation.dot", "kasmina.seeds.active",
            "kasmina.isolation.violations", "kasmina.commands.rejected_total"} <= names
    stage_events = [e for e in packet.events if e.attributes["event"] == "seed_stage"]
    assert [e.attributes["to_stage"] for e in stage_events] == ["GERMINATED", "TRAINING", "BLENDING"]
    assert rig.k.drain_events() == []


async def test_evidence_outside_probation_is_ignored_and_missing_evidence_culls() -> None:
    rig = Rig()
    assert not rig.k.report_evidence(SEED, loss_with=0.1, loss_without=0.2)
    await rig.germinate()
    rig.until(S.SEED_STAGE_PROBATIONARY)
    assert not rig.k.report_evidence(SEED, loss_with=0.1, loss_without=float("nan"))
    rig.step(5)  # probation (2) + grace (3) with no evidence
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED
    verdicts = [e for e in events(rig.k) if e["event"] == "seed_verdict"]
    assert verdicts[-1]["verdict"] == "cull"


async def test_fossilize_command_needs_evidence() -> None:
    """The automatic verdict's bar, the number of reports included (one report used to be enough)."""
    rig = Rig(fast_settings(probation_steps=50, min_evidence=2))
    await rig.germinate()
    rig.until(S.SEED_STAGE_PROBATIONARY)
    with pytest.raises(Exception, match="insufficient_evidence"):
        rig.k.apply_command(command(op=pb.SEED_OP_FOSSILIZE))
    rig.k.report_evidence(SEED, loss_with=0.3, loss_without=0.4)
    with pytest.raises(Exception, match="insufficient_evidence"):
        rig.k.apply_command(command(op=pb.SEED_OP_FOSSILIZE))
    rig.k.report_evidence(SEED, loss_with=0.3, loss_without=0.4)
    assert rig.k.apply_command(command(op=pb.SEED_OP_FOSSILIZE)).action == "fossilized"
    assert rig.k.stage(SEED) == S.SEED_STAGE_FOSSILIZED


async def test_cull_all_before_a_rollback() -> None:
    rig = Rig()
    await rig.germinate()
    rig.until(S.SEED_STAGE_BLENDING)
    assert rig.k.cull_all() == [SEED] and rig.k.cull_all() == []
    assert rig.k.stage(SEED) == S.SEED_STAGE_CULLED and rig.model.slot.seed is None
    assert all(not k.startswith("slot.seed") for k in rig.model.state_dict())
