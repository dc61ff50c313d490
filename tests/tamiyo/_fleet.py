"""Test helpers: a Tamiyo service running in-process against the real test Redis, and a stand-in for
the blueprint library that answers `blueprint.query` over the real bus with a real catalogue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient, OonaSettings
from esper.tamiyo.service import TamiyoService
from esper.tamiyo.settings import TamiyoSettings


def catalog() -> pb.BlueprintCatalog:
    descriptor = pb.BlueprintDescriptor(blueprint_id="BP001", name="residual_mlp", tier=pb.BLUEPRINT_TIER_SAFE,
                                        risk=0.1, description="residual MLP adapter")
    descriptor.allowed_parameters["alpha"].min_value = 0.0
    descriptor.allowed_parameters["alpha"].max_value = 1.0
    graph = pb.BlueprintGraph(
        layers=[pb.BlueprintLayer(layer_type="linear", depth=1.0, latency_ms=0.1, parameter_count=4096.0),
                pb.BlueprintLayer(layer_type="linear", depth=2.0, latency_ms=0.1, parameter_count=4096.0)],
        activations=[pb.BlueprintActivation(activation_type="relu", saturation=0.05)],
        parameters=[pb.BlueprintParameter(name="alpha", min_value=0.0, max_value=1.0, default_value=0.1)],
        adjacency=[pb.LayerEdge(src=0, dst=1)], monitored_layers=[0], blend_methods=["linear"],
    )
    return pb.BlueprintCatalog(entries=[pb.BlueprintCatalogEntry(descriptor=descriptor, graph=graph)])


def packet(step: int = 1, *, loss_delta: float = -0.01, run: str = "run1") -> pb.SystemStatePacket:
    return pb.SystemStatePacket(
        packet_id=f"pkt-{step}", training_run_id=run, global_step=step, current_epoch=1, validation_loss=0.5,
        training_loss=0.6, training_metrics={"loss": 0.6, "gradient_norm": 1.0, "loss_delta": loss_delta,
                                             "samples_per_s": 4000.0, "hook_latency_ms": 1.0},
        seed_states=[pb.SeedState(seed_id=f"seed-{i}", stage=pb.SEED_STAGE_DORMANT, layer_depth=i + 1)
                     for i in range(3)],
    )


def tamiyo_settings(bus: OonaSettings, var_dir: Path, **overrides: object) -> TamiyoSettings:
    base = bus.model_dump()
    base.update(var_dir=var_dir, policy_dir=var_dir / "policies", enable_fault_injection=True, block_ms=20,
                breaker_cooldown_ms=300.0, metadata_timeout_ms=200.0)
    base.update(overrides)
    return TamiyoSettings(**base)


@asynccontextmanager
async def running_tamiyo(settings: TamiyoSettings) -> AsyncIterator[TamiyoService]:
    service = TamiyoService(settings)
    await service.client.connect()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.consumer.run(stop)), asyncio.create_task(service.catalog.run(stop))]
    try:
        yield service
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        service.worker.close()
        await service.client.close()


@asynccontextmanager
async def urza_stand_in(client: OonaClient) -> AsyncIterator[list[str]]:
    """Answers BlueprintQuery with `catalog()`; yields the request ids it answered."""
    answered: list[str] = []

    async def answer(d: Delivery) -> pb.BlueprintCatalog:
        query = d.message_as(pb.BlueprintQuery)
        answered.append(query.request_id)
        reply = catalog()
        reply.request_id = query.request_id
        return reply

    consumer = Consumer(client, "blueprint.query", group="urza", handler=answer, block_ms=20)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield answered
    finally:
        stop.set()
        await task
