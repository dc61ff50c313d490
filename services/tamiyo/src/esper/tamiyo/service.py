"""`python -m esper.tamiyo`: the policy worker process.

Consumes both lanes of `state` in consumer group `tamiyo` (replicas share the group), answers each
packet through `TamiyoWorker`, publishes decision telemetry off the reply path, keeps blueprint
metadata fresh in the background, and serves /metrics and /healthz.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from esper.core.breaker import CircuitBreaker
from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat
from esper.core.lifecycle import Lifecycle, tune_gc_for_hot_loop
from esper.core.logging import configure_logging, get_logger
from esper.core.telemetry import build_event, build_telemetry_packet, packet_priority
from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError
from esper.oona.connection import RETRYABLE
from esper.tamiyo.catalog import BlueprintCatalog
from esper.tamiyo.compile import CompiledPolicy
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.graph import GraphBuilder
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import REGISTRY_FILE, RegistrySet
from esper.tamiyo.settings import TamiyoSettings
from esper.tamiyo.worker import Faults, TamiyoWorker, _device

log = get_logger("esper.tamiyo.service")

NORMS_FILE = "gnn_norms.json"
POLICY_FILE = "current.pt"
FAULT_KEY = "esper.fault.tamiyo"  # drills set fields inference_delay_ms / crash_after (opt-in only)


def load_model(settings: TamiyoSettings, device: torch.device) -> TamiyoGNN:
    """The GNN, from `policy_dir/current.pt` when present (weights only, never a pickled module)."""
    torch.manual_seed(0)  # replicas without a checkpoint start from the same weights
    model = TamiyoGNN()
    path = settings.policy_dir / POLICY_FILE
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        log.info("policy checkpoint loaded", path=str(path))
    return model.to(device).eval()


def load_state(settings: TamiyoSettings) -> tuple[FeatureNormaliser, RegistrySet]:
    var = Path(settings.var_dir)
    norms = FeatureNormaliser.load_or_default(var / NORMS_FILE)
    registries = RegistrySet.load(var) if (var / REGISTRY_FILE).exists() else RegistrySet.new()
    return norms, registries


class TamiyoService:
    """Wiring: bus client, consumer, worker, catalogue refresher, telemetry publisher."""

    def __init__(self, settings: TamiyoSettings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.client = OonaClient.from_settings(settings, sender="tamiyo", metrics=OonaMetrics(self.registry))
        torch.set_num_threads(settings.cpu_threads)
        self.device = _device(settings.device)
        self.norms, self.registries = load_state(settings)
        builder = GraphBuilder(self.norms, self.registries, device=self.device)
        policy = CompiledPolicy(load_model(settings, self.device), enabled=settings.enable_compile)
        cooldown_s = settings.breaker_cooldown_ms / 1000.0
        self.catalog = BlueprintCatalog(
            self.client, timeout_ms=settings.metadata_timeout_ms, ttl_s=settings.metadata_cache_ttl_s,
            breaker=CircuitBreaker("metadata", failure_threshold=settings.breaker_failures_to_open,
                                   reset_timeout_s=cooldown_s),
            on_failure=self._metadata_failed,
        )
        self.faults = Faults(settings.fault_inference_delay_ms, settings.fault_crash_after)
        self.worker = TamiyoWorker(settings, keys=self.client.keys, builder=builder, policy=policy,
                                   catalog=self.catalog, registry=self.registry, faults=self.faults)
        self.consumer = Consumer(self.client, "state", group=settings.group, handler=self.handle,
                                 name=f"tamiyo-{settings.instance_id}")
        self._background: set[asyncio.Task[None]] = set()

    async def handle(self, delivery: Delivery) -> Message:
        packet = delivery.message_as(pb.SystemStatePacket)
        result = await self.worker.decide(packet, self.worker.deadline_for(delivery))
        self._spawn(self._publish_telemetry(result.telemetry))  # runs after the reply went out
        return result.reply

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_telemetry(self, make: Callable[[], pb.TelemetryPacket]) -> None:
        """Off the reply path; a refusal (rate limit, breaker, Redis) is counted, never raised."""
        packet = make()
        try:
            await self.client.publish("telemetry", packet, priority=packet_priority(packet))  # type: ignore[arg-type]
        except PublishError as e:
            self.worker.metrics.telemetry_dropped.labels(type(e).__name__).inc()
            log.warning("decision telemetry not sent", error=str(e))

    def _metadata_failed(self, code: str, detail: str) -> None:
        level = pb.TELEMETRY_LEVEL_WARNING
        event = build_event(code if code == "timeout_urza" else "metadata_unavailable", level=level,
                            description=detail[:200], reason=code)
        self._spawn(self._publish_telemetry(lambda: build_telemetry_packet("tamiyo", events=[event])))

    async def _watch_faults(self, stop: asyncio.Event) -> None:
        """Drills change the injected delay at run time through a Redis hash (opt-in only)."""
        while not stop.is_set():
            try:
                raw = await self.client.redis.hgetall(FAULT_KEY)
                self.faults.inference_delay_ms = float(raw.get(b"inference_delay_ms", b"0") or 0)
                self.faults.crash_after = int(raw.get(b"crash_after", b"0") or 0)
            except (*RETRYABLE, ValueError) as e:
                log.warning("fault knob read failed", error=str(e))
            try:
                async with asyncio.timeout(0.1):
                    await stop.wait()
            except TimeoutError:
                pass

    def health(self) -> tuple[bool, Mapping[str, object]]:
        return True, {"decisions": self.worker.decisions, "conservative": self.worker.conservative.active,
                      "inference_breaker": self.worker.inference_breaker.state_name,
                      "metadata": self.catalog.last_failure or "ok", "device": str(self.device)}

    def save_state(self) -> None:
        var = Path(self.settings.var_dir)
        var.mkdir(parents=True, exist_ok=True)
        self.norms.save(var / NORMS_FILE)
        self.registries.save(var)


async def serve(settings: TamiyoSettings) -> int:
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="tamiyo")
    life = Lifecycle("tamiyo", drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    service = TamiyoService(settings)
    await service.client.connect()
    stop = life.stop_event
    http: HealthServer | None = None
    if settings.metrics_port >= 0:
        http = HealthServer(service.registry, service.health, host=settings.metrics_host, port=settings.metrics_port)
        await http.start()
    beat = Heartbeat(service.client.redis, "tamiyo", settings.instance_id, interval_s=settings.heartbeat_interval_s,
                     ttl_s=settings.heartbeat_ttl_s)
    tasks = [asyncio.create_task(service.consumer.run(stop)), asyncio.create_task(service.catalog.run(stop)),
             asyncio.create_task(beat.run(stop))]
    if settings.enable_fault_injection:
        log.warning("fault injection enabled (drills only)")
        tasks.append(asyncio.create_task(service._watch_faults(stop)))
    tune_gc_for_hot_loop()
    log.info("tamiyo ready", device=str(service.device), compile=service.worker.policy.compile_reason,
             group=settings.group, consumer=service.consumer.name)
    try:
        await life.wait_stopped()
        await life.drain(tasks)
    finally:
        service.worker.close()
        service.save_state()
        if http is not None:
            await http.stop()
        await service.client.close()
        log.info("tamiyo stopped", decisions=service.worker.decisions)
    return 0
