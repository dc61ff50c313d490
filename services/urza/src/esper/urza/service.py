"""`python -m esper.urza`: the blueprint library process.

Three consumers in group `urza`:
- `blueprint.query`: `BlueprintQuery` → `BlueprintCatalog` (descriptor, BSDS when issued, graph when asked).
- `kernel.request`: `KernelPrefetchRequest` → `KernelArtifactReady` or `KernelArtifactError` (typed
  reason). Requests with `reply_to` get the answer there; the others on `kernel.ready` / `kernel.error`.
  Stale requests (payload `issued_at` missing or outside the freshness window) and replayed request ids
  are dropped without an answer, counted and reported.
- `bsds`: `BSDSIssued` → `extras["bsds"]` of the blueprint.

SQLite and artifact reads block, so they run in worker threads (`asyncio.to_thread`), never on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from esper.core.clock import now_ms
from esper.core.errors import ConfigurationError
from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat
from esper.core.lifecycle import Lifecycle
from esper.core.logging import configure_logging, get_logger
from esper.core.telemetry import build_event, build_telemetry_packet, packet_priority
from esper.leyline import ReplayCache, ReplayError, pb
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError, Reject
from esper.urza.errors import KernelReason, UnknownBlueprintError, UrzaError
from esper.urza.library import UrzaLibrary
from esper.urza.metrics import UrzaMetrics
from esper.urza.records import ready_message
from esper.urza.settings import UrzaSettings

log = get_logger("esper.urza.service")

Staleness = Literal["missing_issued_at", "stale", "future"]


def staleness(request: pb.KernelPrefetchRequest, *, now: int, window_ms: int) -> Staleness | None:
    """Why a kernel request is too old (or too far ahead) to answer; None when it is fresh."""
    if not request.HasField("issued_at"):
        return "missing_issued_at"
    age = now - request.issued_at.ToMilliseconds()
    if age > window_ms:
        return "stale"
    if -age > window_ms:
        return "future"
    return None


def error_message(request: pb.KernelPrefetchRequest, reason: KernelReason) -> pb.KernelArtifactError:
    return pb.KernelArtifactError(request_id=request.request_id, blueprint_id=request.blueprint_id, reason=reason)


@dataclass(slots=True)
class UrzaStats:
    """Counters a test or drill can read without scraping Prometheus."""

    ready: int = 0
    errors: int = 0
    stale_dropped: int = 0
    replay_dropped: int = 0
    catalog_queries: int = 0
    bsds_stored: int = 0
    bsds_rejected: int = 0


class UrzaService:
    """Wiring: bus client, the catalogue, three consumers, telemetry."""

    def __init__(self, settings: UrzaSettings, *, registry: CollectorRegistry | None = None,
                 library: UrzaLibrary | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = UrzaMetrics(self.registry)
        self.client = OonaClient.from_settings(settings, sender="urza", metrics=OonaMetrics(self.registry))
        self.library = library or UrzaLibrary(settings.db_path, settings.artifact_dir,
                                              busy_timeout_ms=settings.busy_timeout_ms)
        self.stats = UrzaStats()
        window = settings.kernel_freshness_window_ms
        self._replay = ReplayCache(capacity=settings.kernel_nonce_cache_size, ttl_ms=2 * window)
        name = settings.consumer_name or f"urza-{settings.instance_id}"
        self.consumers = [
            Consumer(self.client, "kernel.request", group=settings.group, handler=self.handle_kernel_request,
                     name=name),
            Consumer(self.client, "blueprint.query", group=settings.group, handler=self.handle_query, name=name),
            Consumer(self.client, "bsds", group=settings.group, handler=self.handle_bsds, name=name),
        ]
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def seed(self) -> int:
        """Register Karn's descriptors (and graphs for `seed_slot`) when `seed_karn` is on."""
        if not self.settings.seed_karn:
            return 0
        try:
            n = await asyncio.to_thread(self.library.seed_from_karn, self.settings.seed_slot)
        except ImportError as e:
            raise ConfigurationError(f"URZA_SEED_KARN is on but Karn's catalogue is not importable: {e}") from e
        log.info("karn descriptors seeded", blueprints=n, slot=self.settings.seed_slot)
        return n

    async def run(self, stop: asyncio.Event) -> None:
        """Serve all three channels until `stop` is set."""
        await asyncio.gather(*(c.run(stop) for c in self.consumers))

    async def close(self) -> None:
        """Let background telemetry finish, close the bus client and the catalogue."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.close()
        await asyncio.to_thread(self.library.close)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        s = self.stats
        return True, {"kernels_ready": s.ready, "kernel_errors": s.errors, "stale_dropped": s.stale_dropped,
                      "replay_dropped": s.replay_dropped, "catalog_queries": s.catalog_queries,
                      "bsds_stored": s.bsds_stored}

    def heartbeat_status(self) -> Mapping[str, str]:
        return {"kernels_ready": str(self.stats.ready), "kernel_errors": str(self.stats.errors)}

    # -- kernel.request ----------------------------------------------------------------------------

    async def handle_kernel_request(self, delivery: Delivery) -> Message | None:
        request = delivery.message_as(pb.KernelPrefetchRequest)
        now = now_ms()
        if not request.request_id or not request.blueprint_id:
            return await self._kernel_error(delivery, request, "missing_id", "request_id and blueprint_id are required")
        why = staleness(request, now=now, window_ms=self.settings.kernel_freshness_window_ms)
        if why is not None:
            self._dropped("stale", request, why)
            return None
        try:
            self._replay.check(request.request_id, delivery.message_id, now)
        except ReplayError:
            self._dropped("replay", request, "request_id seen before")
            return None
        t0 = time.perf_counter()
        try:
            record = await asyncio.to_thread(self.library.verify_kernel, request.blueprint_id)
        except UrzaError as e:
            self.metrics.fetch_latency.observe(time.perf_counter() - t0)
            return await self._kernel_error(delivery, request, e.reason, str(e))
        self.metrics.fetch_latency.observe(time.perf_counter() - t0)
        self.metrics.kernel_requests.labels("ready").inc()
        self.stats.ready += 1
        reply = ready_message(record, request_id=request.request_id, blueprint_id=request.blueprint_id)
        return await self._answer(delivery, "kernel.ready", reply)

    async def _kernel_error(self, delivery: Delivery, request: pb.KernelPrefetchRequest, reason: KernelReason,
                            detail: str) -> Message | None:
        self.metrics.kernel_requests.labels(reason).inc()
        self.stats.errors += 1
        log.warning("kernel request failed", reason=reason, blueprint_id=request.blueprint_id,
                    request_id=request.request_id, detail=detail[:300])
        self._telemetry("kernel_artifact_error", detail, reason=reason, blueprint_id=request.blueprint_id,
                        request_id=request.request_id, training_run_id=request.training_run_id)
        return await self._answer(delivery, "kernel.error", error_message(request, reason))

    def _dropped(self, result: Literal["stale", "replay"], request: pb.KernelPrefetchRequest, why: str) -> None:
        self.metrics.kernel_requests.labels(result).inc()
        if result == "stale":
            self.metrics.kernel_stale_dropped.inc()
            self.stats.stale_dropped += 1
        else:
            self.metrics.kernel_replay_dropped.inc()
            self.stats.replay_dropped += 1
        name = f"kernel_{result}_dropped"
        log.warning(name, why=why, blueprint_id=request.blueprint_id, request_id=request.request_id)
        self._telemetry(name, f"{name}: {why}", reason=why, blueprint_id=request.blueprint_id,
                        request_id=request.request_id, training_run_id=request.training_run_id)

    async def _answer(self, delivery: Delivery, channel: str, reply: Message) -> Message | None:
        """The reply goes to the requester's `reply_to` (the consumer sends it with the ack); a request
        without one is answered on `channel` (a failed publish leaves the entry for redelivery)."""
        if delivery.envelope.reply_to:
            return reply
        await self.client.publish(channel, reply)
        return None

    # -- blueprint.query ---------------------------------------------------------------------------

    async def handle_query(self, delivery: Delivery) -> pb.BlueprintCatalog:
        query = delivery.message_as(pb.BlueprintQuery)
        entries = await asyncio.to_thread(self.library.catalog_entries, list(query.blueprint_ids),
                                          query.include_graph)
        reply = pb.BlueprintCatalog(request_id=query.request_id, entries=entries)
        reply.issued_at.FromMilliseconds(now_ms())
        self.metrics.catalog_queries.inc()
        self.stats.catalog_queries += 1
        return reply

    # -- bsds --------------------------------------------------------------------------------------

    async def handle_bsds(self, delivery: Delivery) -> None:
        """Store the sheet; one that can never be stored (no blueprint id, unknown blueprint) is
        dead-lettered at once, counted and reported. `BSDSFailed` is Urabrask's note to operators (nothing
        to store); any other type does not belong on `bsds` and is dead-lettered."""
        if delivery.message_type == pb.BUS_MESSAGE_TYPE_BSDS_FAILED:
            return None
        if delivery.message_type != pb.BUS_MESSAGE_TYPE_BSDS_ISSUED:
            self._bsds_rejected("unexpected_type", f"message type {delivery.message_type} on bsds", "")
        issued = delivery.message_as(pb.BSDSIssued)
        if not issued.HasField("bsds") or not issued.bsds.blueprint_id:
            self._bsds_rejected("missing_id", "BSDSIssued without a BSDS blueprint_id", "")
        try:
            await asyncio.to_thread(self.library.set_bsds, issued.bsds)
        except UnknownBlueprintError as e:
            self._bsds_rejected("unknown_blueprint", str(e), issued.bsds.blueprint_id)
        self.metrics.bsds_stored.inc()
        self.stats.bsds_stored += 1
        log.info("bsds stored", blueprint_id=issued.bsds.blueprint_id,
                 hazard=pb.HazardBand.Name(issued.bsds.hazard_band))
        return None

    def _bsds_rejected(self, reason: str, detail: str, blueprint_id: str) -> NoReturn:
        self.metrics.bsds_rejected.labels(reason).inc()
        self.stats.bsds_rejected += 1
        self._telemetry("bsds_rejected", detail, reason=reason, blueprint_id=blueprint_id)
        raise Reject(f"{reason}: {detail}")

    # -- telemetry ---------------------------------------------------------------------------------

    def _telemetry(self, name: str, description: str, **attributes: object) -> None:
        """One WARNING event, published off the reply path."""
        event = build_event(name, level=pb.TELEMETRY_LEVEL_WARNING, description=description[:200], **attributes)
        self._spawn(self._publish_telemetry(build_telemetry_packet("urza", events=[event])))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_telemetry(self, packet: pb.TelemetryPacket) -> None:
        """A refusal (rate limit, breaker, Redis) is counted and logged, never raised."""
        try:
            await self.client.publish("telemetry", packet, priority=packet_priority(packet))  # type: ignore[arg-type]
        except PublishError as e:
            self.metrics.telemetry_dropped.labels(type(e).__name__).inc()
            log.warning("urza telemetry not sent", error=str(e))


async def serve(settings: UrzaSettings) -> int:
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="urza")
    life = Lifecycle("urza", drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    service = UrzaService(settings)
    http: HealthServer | None = None
    try:
        try:
            await service.seed()
        except ConfigurationError as e:
            log.error("urza cannot start", error=str(e))
            return 2
        await service.client.connect()
        stop = life.stop_event
        if settings.metrics_port >= 0:
            http = HealthServer(service.registry, service.health, host=settings.metrics_host,
                                port=settings.metrics_port)
            await http.start()
        beat = Heartbeat(service.client.redis, "urza", settings.instance_id, interval_s=settings.heartbeat_interval_s,
                         ttl_s=settings.heartbeat_ttl_s, status=service.heartbeat_status)
        tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(beat.run(stop))]
        log.info("urza ready", group=settings.group, db=str(settings.db_path), artifacts=str(settings.artifact_dir),
                 consumer=service.consumers[0].name)
        await life.wait_stopped()
        await life.drain(tasks)
    finally:
        if http is not None:
            await http.stop()
        await service.close()
        log.info("urza stopped", kernels_ready=service.stats.ready, kernel_errors=service.stats.errors)
    return 0
