"""The trainer's real `SystemStatePacket`s, read off the `state` channel by a stand-in Tamiyo (a real
Oona consumer in group `tamiyo` answering each with a DecisionFailure): every step's packet carries the
documented training metrics (REFERENCE §6.5, issue 5), finite and consistent with the step."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaSettings
from esper.tolaria.bus import BusThread
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from tests.conftest import ClientFactory

DOCUMENTED = {"loss", "accuracy", "gradient_norm", "samples_per_s", "hook_latency_ms", "step_latency_ms",
              "loss_delta", "loss_ewma", "loss_volatility", "grad_norm_ewma", "grad_var", "kasmina.apply_ms",
              "kasmina.finalize_ms", "learning_rate", "cpu_mem_peak_gb", "optimizer_family_index",
              "epochs_total", "steps_total"}


async def test_every_step_sends_the_documented_metrics(make_client: ClientFactory, settings: OonaSettings,
                                                         tmp_path: Path) -> None:
    packets: list[pb.SystemStatePacket] = []

    async def tamiyo(d: Delivery) -> pb.DecisionFailure:
        packet = d.message_as(pb.SystemStatePacket)
        packets.append(packet)
        return pb.DecisionFailure(packet_id=packet.packet_id, reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE)

    stop = asyncio.Event()
    responder = asyncio.create_task(Consumer(await make_client("tamiyo"), "state", group="tamiyo",
                                             handler=tamiyo).run(stop))
    ts = TolariaSettings(var_dir=tmp_path / "tolaria", epochs=1, hidden_width=16, seed=3, learning_rate=0.01,
                         emergency_enabled=False, metrics_port=-1, redis_url=settings.redis_url,
                         leyline_secret=settings.leyline_secret, run_id="run-packets", decision_mode="sync",
                         tamiyo_step_timeout_ms=5_000.0)  # sync, generous: every step's packet is answered
    bus = BusThread(ts)
    await asyncio.to_thread(bus.start)
    trainer = Trainer(ts, bus=bus, registry=CollectorRegistry())
    try:
        await asyncio.to_thread(trainer.run)
    finally:
        trainer.close()
        await asyncio.to_thread(bus.stop)
        stop.set()
        await responder
    s = trainer.summary(clean_shutdown=True)
    assert s["steps"] == trainer.step == len(packets) >= 10 and s["decisions"] == s["steps"]
    assert [p.global_step for p in packets] == list(range(1, trainer.step + 1))
    assert {p.training_run_id for p in packets} == {"run-packets"}
    assert len({p.packet_id for p in packets}) == len(packets)
    for i, p in enumerate(packets):
        m = dict(p.training_metrics)
        assert set(m) >= DOCUMENTED, DOCUMENTED - set(m)
        assert all(math.isfinite(v) for v in m.values())
        assert m["loss"] == p.training_loss > 0 and 0.0 <= m["accuracy"] <= 1.0
        assert m["gradient_norm"] > 0 and m["samples_per_s"] > 0 and m["step_latency_ms"] > 0
        assert m["learning_rate"] == pytest.approx(0.01) and m["optimizer_family_index"] == 1.0  # adam (float32 map)
        assert m["steps_total"] == trainer.step and m["cpu_mem_peak_gb"] > 0.01
        assert "cpu_util_percent" not in m  # a CPU trainer: see resources.py
        # the previous step's decision was answered before this packet was built (sync mode)
        assert ("tamiyo_latency_ms" in m) == (i > 0) and m.get("tamiyo_latency_ms", 1.0) > 0
        assert [st.stage for st in p.seed_states] == [pb.SEED_STAGE_DORMANT] * len(trainer.host.slot_modules) > []
    assert packets[-1].training_metrics["tamiyo_latency_ms"] == pytest.approx(trainer.stats.decision_ms[-2], rel=1e-6)
