"""End to end on a tiny host: a signed GERMINATE, the kernel forged by Tezzeret and served by a real
Urza over a real Redis, then every stage to FOSSILIZED on evidence of benefit, or back to DORMANT
through CULLED → EMBARGOED → RESETTING when the evidence says no."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from esper.kasmina import Kasmina, KernelClient
from esper.kasmina.optim import seed_group
from esper.leyline import pb
from esper.oona import OonaSettings
from esper.urza.store import ArtifactStore
from tests.conftest import ClientFactory
from tests.kasmina._helpers import KEYS, SEED, TinyHost, clock, command, data, events, fast_settings, train_step
from tests.kasmina._urza import forge
from tests.urza._service import running_urza, urza_settings

S = pb


def _evidence(kasmina: Kasmina) -> float:
    return {s.seed_id: s for s in kasmina.seed_states()}[SEED].metrics["evidence_count"]


async def _run(make_client: ClientFactory, settings: OonaSettings, var: Path, *, beneficial: bool) -> list[int]:
    forge(var, "BP002")
    torch.manual_seed(0)
    model = TinyHost()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kernels = KernelClient(await make_client("kasmina"), ArtifactStore(var / "artifacts"), training_run_id="run-e2e")
    kasmina = Kasmina(keys=KEYS, settings=fast_settings(), kernels=kernels, optimizer=opt, clock_ms=clock)
    assert kasmina.register_host(model) == [SEED]
    batch, val = data(), data(seed=1)
    async with running_urza(urza_settings(settings, var)):
        outcome = kasmina.apply_command(command(blueprint="BP002", annotations={"blend_mode": "CONVEX",
                                                                                  "blending_method": "cosine"}))
        assert outcome.action == "germinated" and outcome.kernel_pending
        task = kasmina.start_prefetch()
        assert task is not None
        assert await task == 1  # fetched off the step path; attached at the next boundary
    target = S.SEED_STAGE_FOSSILIZED if beneficial else S.SEED_STAGE_DORMANT
    for step in range(1, 80):
        train_step(model, kasmina, opt, batch, step)
        if kasmina.stage(SEED) == S.SEED_STAGE_PROBATIONARY and not _evidence(kasmina):
            model.eval()
            with torch.no_grad():
                loss_with = F.cross_entropy(model(val[0]), val[1]).item()
                with kasmina.ablated(SEED):
                    loss_without = F.cross_entropy(model(val[0]), val[1]).item()
            # The "evidence" input: the measured pair, shifted to the verdict this test wants.
            delta = abs(loss_without - loss_with) + 0.05
            claimed_without = loss_with + delta if beneficial else loss_with - delta
            assert kasmina.report_evidence(SEED, loss_with=loss_with, loss_without=claimed_without)
            exported = {s.seed_id: s for s in kasmina.seed_states()}[SEED].metrics["evidence_mean"]
            assert exported == pytest.approx(claimed_without - loss_with, rel=1e-5)  # what the verdict weighs
        if kasmina.stage(SEED) == target:
            break
    assert kasmina.stage(SEED) == target
    assert kernels.stats.ready == 1 and kernels.stats.loads == 1
    return [t.to_stage for t in kasmina.history(SEED)]


async def test_germinate_to_fossilized(make_client: ClientFactory, settings: OonaSettings, tmp_path: Path) -> None:
    stages = await _run(make_client, settings, tmp_path, beneficial=True)
    assert stages == [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING, S.SEED_STAGE_SHADOWING,
                      S.SEED_STAGE_PROBATIONARY, S.SEED_STAGE_FOSSILIZED]


async def test_germinate_to_cull_and_back_to_dormant(make_client: ClientFactory, settings: OonaSettings,
                                                     tmp_path: Path) -> None:
    stages = await _run(make_client, settings, tmp_path, beneficial=False)
    assert stages == [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING, S.SEED_STAGE_SHADOWING,
                      S.SEED_STAGE_PROBATIONARY, S.SEED_STAGE_CULLED, S.SEED_STAGE_EMBARGOED,
                      S.SEED_STAGE_RESETTING, S.SEED_STAGE_DORMANT]


async def test_kernel_fetch_timeout_fails_the_germination(make_client: ClientFactory, tmp_path: Path) -> None:
    """Urza is not running: the germination fails explicitly; no fallback kernel is ever attached."""
    model = TinyHost()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kernels = KernelClient(await make_client("kasmina"), ArtifactStore(tmp_path / "artifacts"), timeout_ms=100.0)
    kasmina = Kasmina(keys=KEYS, settings=fast_settings(), kernels=kernels, optimizer=opt, clock_ms=clock)
    kasmina.register_host(model)
    kasmina.apply_command(command())
    assert await kasmina.fetch_kernels() == 1
    train_step(model, kasmina, opt, data(), 1)
    assert kasmina.stage(SEED) == S.SEED_STAGE_CULLED and model.slot.seed is None and seed_group(opt, SEED) is None
    failed = [e for e in events(kasmina) if e["event"] == "germination_failed"]
    assert [e["reason"] for e in failed] == ["timeout"]
