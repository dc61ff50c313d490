"""`python -m esper.tamiyo`: the policy worker process.

Consumes both lanes of `state` in consumer group `tamiyo` (replicas share the group), answers each
packet through `TamiyoWorker`, publishes decision telemetry off the reply path, keeps blueprint
metadata fresh in the background, and serves /metrics and /healthz.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import torch
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.core.breaker import CircuitBreaker
from esper.core.clock import now_ms, sleep_or_stop
from esper.core.health_server import HealthServer
from esper.core.heartbeat import Heartbeat
from esper.core.lifecycle import Lifecycle, tune_gc_for_hot_loop
from esper.core.logging import configure_logging, get_logger
from esper.core.telemetry import build_event, build_telemetry_packet, packet_priority
from esper.leyline import pb
from esper.oona import Consumer, Delivery, OonaClient, OonaMetrics, PublishError, Reject
from esper.oona.connection import RETRYABLE
from esper.tamiyo.catalog import BlueprintCatalog
from esper.tamiyo.checkpoint import PolicyStore, PolicyUpdateRejected
from esper.tamiyo.compile import CompiledPolicy, warmup_inputs
from esper.tamiyo.field_reports import FieldReportError, FieldReportStore, outcome_for
from esper.tamiyo.gnn import GNNConfig, TamiyoGNN
from esper.tamiyo.graph import GraphBuilder
from esper.tamiyo.normaliser import FeatureNormaliser
from esper.tamiyo.registry import REGISTRY_FILE, RegistryMismatchError, RegistrySet
from esper.tamiyo.schema import POLICY_VERSION
from esper.tamiyo.settings import TamiyoSettings
from esper.tamiyo.updates import LivePolicy, PolicyUpdater, bus_rejection_reason, check_update
from esper.tamiyo.worker import Faults, TamiyoWorker, _device

log = get_logger("esper.tamiyo.service")

NORMS_FILE = "gnn_norms.json"
FIELD_REPORTS_FILE = "field_reports.db"
FAULT_KEY = "esper.fault.tamiyo"  # drills set fields inference_delay_ms / crash_after (opt-in only)


def initial_policy(settings: TamiyoSettings, updater: PolicyUpdater, device: torch.device) -> LivePolicy:
    """The stored policy (validated like an update), else the initial weights every replica shares.

    A stored policy that fails validation raises: serving other weights than the ones on disk
    would be a silent fallback.
    """
    stored = updater.store.load()
    if stored is not None:
        live = updater.restore(stored)
        log.info("policy loaded", version=live.version, policy_id=live.policy_id)
        return live
    torch.manual_seed(0)  # replicas without a stored policy start from the same weights
    model = TamiyoGNN(updater.config).to(device).eval()
    return LivePolicy(CompiledPolicy(model, enabled=settings.enable_compile), POLICY_VERSION)


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
        builder = GraphBuilder(self.norms, self.registries, device=self.device,
                               max_blueprints=settings.max_blueprints)
        self.updater = PolicyUpdater(config=GNNConfig(), registries=self.registries,
                                     store=PolicyStore(settings.policy_dir), compile_enabled=settings.enable_compile,
                                     device=self.device)
        live = initial_policy(settings, self.updater, self.device)
        cooldown_s = settings.breaker_cooldown_ms / 1000.0
        self.catalog = BlueprintCatalog(
            self.client, timeout_ms=settings.metadata_timeout_ms, ttl_s=settings.metadata_cache_ttl_s,
            breaker=CircuitBreaker("metadata", failure_threshold=settings.breaker_failures_to_open,
                                   reset_timeout_s=cooldown_s),
            on_failure=self._metadata_failed,
        )
        self.faults = Faults(settings.fault_inference_delay_ms, settings.fault_crash_after)
        self.worker = TamiyoWorker(settings, keys=self.client.keys, builder=builder, policy=live.policy,
                                   catalog=self.catalog, registry=self.registry, faults=self.faults,
                                   policy_version=live.version)
        self.worker.swap(live)
        # One forward now, off any deadline: the first real decision must not pay torch's cold start.
        self.worker.policy(*warmup_inputs(self.device))
        self.consumer = Consumer(self.client, "state", group=settings.group, handler=self.handle,
                                 name=f"tamiyo-{settings.instance_id}")
        # Every replica must apply every update: a group of its own (not the shared `tamiyo` group),
        # starting at the newest update so a fresh replica catches up, destroyed on clean shutdown.
        self.policy_consumer = Consumer(
            self.client, "policy", group=f"tamiyo-policy-{settings.instance_id}", handler=self.handle_policy,
            name=f"tamiyo-{settings.instance_id}", start_at="latest", ephemeral_group=True,
            on_dead_letter=self._policy_dead_letter)
        self._update_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamiyo-upd")
        self._background: set[asyncio.Task[None]] = set()
        # The outbox blocks on fsync: every call goes through one dedicated thread, off the loop.
        self.field_reports = FieldReportStore(Path(settings.var_dir) / FIELD_REPORTS_FILE)
        self._fr_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamiyo-fr")
        r = self.registry
        self.fr_published = Counter("tamiyo_field_reports_published_total", "Field reports published", registry=r)
        self.fr_retries = Counter("tamiyo_field_reports_retries_total", "Field report publish retries", registry=r)
        self.fr_dropped = Counter("tamiyo_field_reports_dropped_total", "Field reports dropped after retries",
                                  registry=r)
        self.fr_pending = Gauge("tamiyo_field_reports_pending", "Field reports waiting to be published", registry=r)
        self.updates_applied = Counter("tamiyo_policy_updates_applied_total", "Policy updates swapped in", registry=r)
        self.updates_rejected = Counter("tamiyo_policy_updates_rejected_total", "Policy updates refused",
                                        ["reason"], registry=r)

    async def handle(self, delivery: Delivery) -> Message:
        packet = delivery.message_as(pb.SystemStatePacket)
        result = await self.worker.decide(packet, self.worker.deadline_for(delivery))
        self._spawn(self._publish_telemetry(result.telemetry))  # runs after the reply went out
        self._spawn(self._record(packet, result.reply))
        return result.reply

    async def handle_policy(self, delivery: Delivery) -> None:
        """Check, build aside, persist, swap (esper.tamiyo.updates); a refusal leaves the live policy
        untouched, emits `policy_update_rejected` and dead-letters the update."""
        update = delivery.message_as(pb.PolicyUpdate)
        live = self.worker.live
        loop = asyncio.get_running_loop()
        try:
            check_update(update, live, now_ms=now_ms(), verify=self.settings.verify_updates,
                         freshness_s=self.settings.update_freshness_sec)
            candidate = await loop.run_in_executor(self._update_thread, self.updater.prepare, update)
            if self.worker.live is not live:
                raise PolicyUpdateRejected("swap_failed", "another update went live meanwhile")
            new = await loop.run_in_executor(self._update_thread, self.updater.commit, candidate)
        except PolicyUpdateRejected as e:
            self._policy_rejected(e.reason, e.detail, policy_id=update.policy_id)
            raise Reject(f"policy update {update.policy_id!r} rejected: {e}") from e
        self.worker.swap(new)
        self.updates_applied.inc()
        log.info("policy update applied", version=new.version, policy_id=new.policy_id, previous=live.version)
        event = build_event("policy_update_applied", level=pb.TELEMETRY_LEVEL_INFO, description=new.version,
                            policy_version=new.version, policy_id=new.policy_id, previous_version=live.version)
        self._spawn(self._publish_telemetry(lambda: build_telemetry_packet("tamiyo", events=[event])))
        return None

    def _policy_dead_letter(self, code: str, detail: str, lane: str) -> None:
        reason = bus_rejection_reason(code)
        if reason is not None:
            self._policy_rejected(reason, f"{code}: {detail}")

    def _policy_rejected(self, reason: str, detail: str, *, policy_id: str = "") -> None:
        self.updates_rejected.labels(reason).inc()
        log.warning("policy update rejected", reason=reason, detail=detail[:300], policy_id=policy_id,
                    live_version=self.worker.live.version)
        event = build_event("policy_update_rejected", level=pb.TELEMETRY_LEVEL_WARNING, description=detail[:200],
                            reason=reason, policy_id=policy_id, live_version=self.worker.live.version)
        self._spawn(self._publish_telemetry(lambda: build_telemetry_packet("tamiyo", events=[event])))

    async def _record(self, packet: pb.SystemStatePacket, reply: Message) -> None:
        """Field report for this decision, observation windows, all in the outbox thread."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._fr_thread, self._record_sync, packet, reply)
        except (FieldReportError, sqlite3.Error) as e:
            log.error("field report not stored", error=str(e), packet_id=packet.packet_id)

    def _record_sync(self, packet: pb.SystemStatePacket, reply: Message) -> None:
        store, s = self.field_reports, self.settings
        issued = now_ms()
        critical = False
        if isinstance(reply, pb.AdaptationCommand):
            reason = reply.annotations.get("risk_reason")
            critical = reason in ("bp_quarantine", "policy_risk_critical", "bsds_handling_quarantine",
                                  "bsds_hazard_critical")
            report = pb.FieldReport(
                version=1, report_id=f"fr-{reply.command_id}", command_id=reply.command_id,
                training_run_id=packet.training_run_id, seed_id=reply.target_seed_id,
                blueprint_id=reply.seed_operation.blueprint_id,
                outcome=outcome_for(reply.command_type, reason),
                tamiyo_policy_version=reply.annotations.get("policy_version", ""),
                metrics={"loss_delta": float(packet.training_metrics.get("loss_delta", 0.0))},
                notes=reason or "",
            )
            report.observation.CopyFrom(packet)  # what Simic learns from: the state and ...
            report.command.CopyFrom(reply)  # ... the command taken on it (signed, as executed)
            report.issued_at.FromMilliseconds(issued)
            store.append(report)
            if reply.command_type == pb.COMMAND_SEED:
                store.open_window(reply, run_id=packet.training_run_id, start_epoch=packet.current_epoch,
                                  epochs=s.fr_obs_window_epochs)
        elif isinstance(reply, pb.DecisionFailure) and reply.packet_id:
            report = pb.FieldReport(
                version=1, report_id=f"fr-fail-{reply.training_run_id}-{reply.packet_id}",
                training_run_id=packet.training_run_id, outcome=pb.FIELD_REPORT_OUTCOME_NEUTRAL,
                tamiyo_policy_version=reply.policy_version,
                notes=pb.DecisionFailureReason.Name(reply.reason),
            )
            report.observation.CopyFrom(packet)
            report.issued_at.FromMilliseconds(issued)
            store.append(report)
        if packet.training_run_id:
            store.observe(run_id=packet.training_run_id, epoch=packet.current_epoch,
                          loss_delta=float(packet.training_metrics.get("loss_delta", 0.0)), critical=critical,
                          issued_at_ms=issued)

    async def publish_field_reports(self, stop: asyncio.Event, *, poll_s: float = 0.2) -> None:
        """Drain the outbox to `field_report` with backoff; prune by retention now and then."""
        loop = asyncio.get_running_loop()
        s = self.settings
        last_prune = 0.0
        while not stop.is_set():
            try:
                due = await loop.run_in_executor(self._fr_thread, self.field_reports.due, now_ms(), 100)
                published: list[str] = []
                for item in due:
                    try:
                        await self.client.publish("field_report", item.report)
                        published.append(item.report_id)
                    except PublishError as e:
                        retry = functools.partial(
                            self.field_reports.mark_failed, item.report_id, now_ms=now_ms(),
                            backoff_ms=s.fr_retry_backoff_ms, mult=s.fr_retry_backoff_mult,
                            max_retries=s.field_report_max_retries)
                        dropped = await loop.run_in_executor(self._fr_thread, retry)
                        (self.fr_dropped if dropped else self.fr_retries).inc()
                        log.warning("field report publish failed", report_id=item.report_id, dropped=dropped,
                                    error=str(e))
                if published:
                    await loop.run_in_executor(self._fr_thread, self.field_reports.mark_published, published)
                    self.fr_published.inc(len(published))
                counts = await loop.run_in_executor(self._fr_thread, self.field_reports.counts)
                self.fr_pending.set(counts["pending"])
                if time.monotonic() - last_prune > 60:
                    last_prune = time.monotonic()
                    await loop.run_in_executor(self._fr_thread, lambda: self.field_reports.prune(
                        now_ms=now_ms(), retention_hours=s.field_report_retention_hours))
            except (FieldReportError, sqlite3.Error) as e:
                log.error("field report outbox failed", error=str(e))
            await sleep_or_stop(stop, poll_s)

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
            await sleep_or_stop(stop, 0.1)

    def health(self) -> tuple[bool, Mapping[str, object]]:
        return True, {"decisions": self.worker.decisions, "conservative": self.worker.conservative.active,
                      "inference_breaker": self.worker.inference_breaker.state_name,
                      "metadata": self.catalog.last_failure or "ok", "device": str(self.device),
                      "policy_version": self.worker.live.version}

    def close_outbox(self) -> None:
        self._update_thread.shutdown(wait=True)
        self._fr_thread.shutdown(wait=True)
        self.field_reports.close()

    def save_state(self) -> None:
        var = Path(self.settings.var_dir)
        var.mkdir(parents=True, exist_ok=True)
        self.norms.save(var / NORMS_FILE)
        self.registries.save(var)


async def serve(settings: TamiyoSettings) -> int:
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="tamiyo")
    life = Lifecycle("tamiyo", drain_timeout_s=settings.drain_timeout_s)
    life.install_signal_handlers()
    try:
        service = TamiyoService(settings)
    except (RegistryMismatchError, PolicyUpdateRejected) as e:
        await report_startup_failure(settings, e)
        return 3
    await service.client.connect()
    stop = life.stop_event
    http: HealthServer | None = None
    if settings.metrics_port >= 0:
        http = HealthServer(service.registry, service.health, host=settings.metrics_host, port=settings.metrics_port)
        await http.start()
    beat = Heartbeat(service.client.redis, "tamiyo", settings.instance_id, interval_s=settings.heartbeat_interval_s,
                     ttl_s=settings.heartbeat_ttl_s)
    tasks = [asyncio.create_task(service.consumer.run(stop)), asyncio.create_task(service.catalog.run(stop)),
             asyncio.create_task(service.policy_consumer.run(stop)),
             asyncio.create_task(beat.run(stop)), asyncio.create_task(service.publish_field_reports(stop))]
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
        service.close_outbox()
        service.save_state()
        if http is not None:
            await http.stop()
        await service.client.close()
        log.info("tamiyo stopped", decisions=service.worker.decisions)
    return 0


async def report_startup_failure(settings: TamiyoSettings, error: RegistryMismatchError | PolicyUpdateRejected) -> None:
    """Refusing to start on state that cannot be trusted is loud: a log line and an ERROR event."""
    name = "registry_mismatch" if isinstance(error, RegistryMismatchError) else "policy_load_failed"
    log.error("tamiyo cannot start", event_name=name, reason=error.reason, error=str(error))
    client = OonaClient.from_settings(settings, sender="tamiyo", metrics=OonaMetrics(CollectorRegistry()))
    event = build_event(name, level=pb.TELEMETRY_LEVEL_ERROR, description=str(error)[:200], reason=error.reason)
    try:
        await client.connect()
        await client.publish("telemetry", build_telemetry_packet("tamiyo", events=[event]))
    except (PublishError, *RETRYABLE) as e:
        log.error("start-up failure not reported on the bus", error=str(e))
    finally:
        await client.close()
