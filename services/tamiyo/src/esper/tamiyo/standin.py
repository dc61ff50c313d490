"""A stand-in for the blueprint library that drills and tests run beside a real Tamiyo.

Until Urza exists (the blueprint issue) something must answer `blueprint.query`; this does it over
the real bus with a real `BlueprintCatalog` (one SAFE blueprint and its graph), so Tamiyo's metadata
path, graph and policy run exactly as they will against Urza. It is a drill fixture, not a fallback:
the worker itself never invents metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient


def sample_catalog() -> pb.BlueprintCatalog:
    """One SAFE blueprint with a small graph: enough for real seed decisions."""
    descriptor = pb.BlueprintDescriptor(blueprint_id="BP001", name="residual_mlp", tier=pb.BLUEPRINT_TIER_SAFE,
                                        risk=0.1, description="residual MLP adapter (drill)")
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


def sample_packet(packet_id: str, step: int, *, run: str = "drill-run", loss_delta: float = -0.01,
                  seeds: int = 3) -> pb.SystemStatePacket:
    """A representative SystemStatePacket: training metrics and `seeds` dormant seeds."""
    return pb.SystemStatePacket(
        packet_id=packet_id, training_run_id=run, global_step=step, current_epoch=1, validation_loss=0.5,
        training_loss=0.6, training_metrics={"loss": 0.6, "gradient_norm": 1.0, "loss_delta": loss_delta,
                                             "samples_per_s": 4000.0, "hook_latency_ms": 1.0},
        seed_states=[pb.SeedState(seed_id=f"seed-{i}", stage=pb.SEED_STAGE_DORMANT, layer_depth=i + 1)
                     for i in range(seeds)],
    )


@contextlib.asynccontextmanager
async def urza_stand_in(client: OonaClient, *, name: str = "urza-stand-in") -> AsyncIterator[list[str]]:
    """Answers every BlueprintQuery with `sample_catalog()`; yields the request ids it answered."""
    answered: list[str] = []

    async def answer(d: Delivery) -> pb.BlueprintCatalog:
        query = d.message_as(pb.BlueprintQuery)
        answered.append(query.request_id)
        reply = sample_catalog()
        reply.request_id = query.request_id
        return reply

    consumer = Consumer(client, "blueprint.query", group="urza", handler=answer, name=name, block_ms=20)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop), name=name)
    try:
        yield answered
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10.0)
