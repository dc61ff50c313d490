"""One Tamiyo decision: SystemStatePacket in, signed AdaptationCommand or explicit DecisionFailure out,
always before the request's deadline.

The CPU work (graph build, GNN, policy mapping, risk engine) is plain synchronous code; the only
waits are on the inference thread, bounded by the deadline. A request that cannot be decided in
time gets `DecisionFailure(TIMEOUT_INFERENCE)` — never a synthetic PAUSE — and the inference that
was still running is discarded when it finishes (no late command).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.core.breaker import CircuitBreaker
from esper.core.clock import now_ms
from esper.core.deadline import Deadline
from esper.core.errors import DependencyViolationError
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import SigningKeys, new_message_id, pb, sign_command
from esper.oona import Delivery
from esper.tamiyo.catalog import BlueprintCatalog, CatalogView
from esper.tamiyo.compile import CompiledPolicy
from esper.tamiyo.conservative import ConservativeMode, ConservativeTransition
from esper.tamiyo.culls import CULLED_PAIRS_ANNOTATION, CullRecord, PerRun, encode_culled
from esper.tamiyo.events import DecisionSnapshot, decision_telemetry
from esper.tamiyo.gnn import PolicyOutputs
from esper.tamiyo.graph import GraphBuilder, GraphInputs
from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.metadata import BlueprintInfo
from esper.tamiyo.policy import (
    ACTION_GERMINATE,
    POLICY_COMMAND_ANNOTATION,
    BlendModeSettings,
    PolicyDecision,
    annotate_blend_mode,
    decide,
)
from esper.tamiyo.risk import RiskInputs, RiskVerdict, evaluate
from esper.tamiyo.schema import POLICY_VERSION
from esper.tamiyo.settings import TamiyoSettings
from esper.tamiyo.updates import LivePolicy

log = get_logger("esper.tamiyo.worker")

DECISION_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1)


TIMEOUT_KINDS = ("busy", "budget", "inference")
"""`tamiyo_timeouts_total{kind}`: the previous forward still running, the budget spent before inference,
inference itself past the budget."""


class TamiyoMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter("tamiyo_decisions_total", "Decisions by outcome (command type or failure)",
                                 ["outcome"], registry=r)
        self.decision_latency = Histogram("tamiyo_decision_seconds", "Handler time per decision",
                                          buckets=DECISION_BUCKETS_S, registry=r)
        self.inference_latency = Histogram("tamiyo_inference_seconds", "GNN forward + policy mapping",
                                           buckets=DECISION_BUCKETS_S, registry=r)
        self.build_latency = Histogram("tamiyo_graph_build_seconds", "Graph build", buckets=DECISION_BUCKETS_S,
                                       registry=r)
        self.timeouts = Counter("tamiyo_timeouts_total", "Decisions past their budget", ["kind"], registry=r)
        for kind in TIMEOUT_KINDS:  # at 0 from the start, so rate()/increase() see the first timeout
            self.timeouts.labels(kind)
        self.coverage = Gauge("tamiyo_feature_coverage", "Average feature coverage of the last graph", registry=r)
        self.conservative = Gauge("tamiyo_conservative_mode", "1 while in conservative mode", registry=r)
        self.breaker = Gauge("tamiyo_breaker_state", "Leyline CircuitBreakerState", ["breaker"], registry=r)
        self.compile_enabled = Gauge("tamiyo_gnn_compile_enabled", "1 while the compiled GNN serves", registry=r)
        self.compile_fallbacks = Gauge("tamiyo_gnn_compile_fallback_total", "Compile fallbacks to eager",
                                       registry=r)
        self.telemetry_dropped = Counter("tamiyo_telemetry_dropped_total", "Decision telemetry not sent",
                                         ["reason"], registry=r)


class DecisionFailed(Exception):
    """Raised inside a decision to answer with an explicit DecisionFailure."""

    def __init__(
        self, reason: pb.DecisionFailureReason.ValueType, detail: str, *, event: str,
        level: int = pb.TELEMETRY_LEVEL_WARNING,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.event = event
        self.level = level


@dataclass(slots=True)
class Faults:
    """Drill-only knobs (refused unless ESPER_ENABLE_FAULT_INJECTION=1); adjustable at run time."""

    inference_delay_ms: float = 0.0
    crash_after: int = 0


@dataclass(slots=True)
class DecisionResult:
    reply: Message
    telemetry: Callable[[], pb.TelemetryPacket]  # built after the reply is sent (off the hot path)
    outcome: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def _germinable(packet: pb.SystemStatePacket) -> frozenset[str]:
    """Seeds that can take a new seed now: DORMANT ones (germinating anything else is illegal)."""
    return frozenset(s.seed_id for s in packet.seed_states if s.stage == pb.SEED_STAGE_DORMANT)


def _device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class TamiyoWorker:
    """Decides one packet at a time. IO (publishing telemetry, the reply) belongs to the caller."""

    def __init__(
        self,
        settings: TamiyoSettings,
        *,
        keys: SigningKeys,
        builder: GraphBuilder,
        policy: CompiledPolicy,
        catalog: BlueprintCatalog | None,
        registry: CollectorRegistry,
        faults: Faults | None = None,
        policy_version: str = POLICY_VERSION,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.builder = builder
        self.heuristic = HeuristicPolicy() if settings.policy == "heuristic" else None
        self.explore = random.Random(settings.explore_seed) if settings.explore_epsilon > 0 else None
        # (seed, blueprint) → GERMINATEs this replica sent: exploration draws among the least-grown
        # designs (policy.decide's `tried`).
        self.grown: dict[tuple[str, str], int] = {}
        # The GNN's memory of each run's culls (the rule-based policy keeps its own): TAMIYO_CULL_MEMORY.
        self.culls: PerRun[CullRecord] | None = PerRun(CullRecord) if settings.cull_memory else None
        # Swapped whole by policy updates (one reference assignment); a decision reads it once.
        self.live = LivePolicy(policy, policy_version)
        self.catalog = catalog
        self.faults = faults or Faults()
        self.metrics = TamiyoMetrics(registry)
        self.conservative = ConservativeMode(timeout_threshold=settings.conservative_timeouts)
        if settings.conservative_mode:
            self.conservative.trigger("configured")
        cooldown_s = settings.breaker_cooldown_ms / 1000.0
        self.inference_breaker = CircuitBreaker("inference", failure_threshold=settings.breaker_failures_to_open,
                                                reset_timeout_s=cooldown_s, on_transition=self._on_breaker)
        self.metrics.breaker.labels("inference").set(self.inference_breaker.state)
        self.blend = BlendModeSettings(mode=settings.blend_mode_default, gate_k=settings.blend_conf_gate_k,
                                       gate_tau=settings.blend_conf_gate_tau, alpha_lo=settings.blend_alpha_lo,
                                       alpha_hi=settings.blend_alpha_hi, alpha_vec_max=settings.blend_alpha_vec_max)
        # One inference thread: a slow forward must not pile up more behind it.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamiyo-gnn")
        self._inflight: asyncio.Future[PolicyOutputs] | None = None
        self.decisions = 0
        self.metrics.compile_enabled.set(policy.compile_enabled)
        self.metrics.compile_fallbacks.set(policy.compile_fallback_total)

    @property
    def policy(self) -> CompiledPolicy:
        return self.live.policy

    def swap(self, live: LivePolicy) -> None:
        """Serve `live` from the next decision on (in-flight decisions finish on the old one)."""
        self.live = live
        self.metrics.compile_enabled.set(live.policy.compile_enabled)
        self.metrics.compile_fallbacks.set(live.policy.compile_fallback_total)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_breaker(self, name: str, old: int, new: int) -> None:
        self.metrics.breaker.labels(name).set(new)
        self.conservative.on_breaker_transition(name, old, new)
        log.warning("breaker transition", breaker=name, old=old, new=new)

    # -- the decision ------------------------------------------------------------------------------

    def deadline_for(self, delivery: Delivery) -> Deadline:
        """Our own deadline: the requester's, minus room for the reply to travel back (at least
        `reply_margin_ms`, and `reply_margin_fraction` of the request's whole budget) — an explicit
        failure that arrives after the requester gave up would be as useless as no answer."""
        env = delivery.envelope
        s = self.settings
        if env.deadline_ms:
            budget_ms = max(0.0, float(env.deadline_ms - env.issued_at_ms))
            margin = max(s.reply_margin_ms, s.reply_margin_fraction * budget_ms)
            # Sub-millisecond arithmetic on the wall clock (an int deadline would eat up to 1 ms more).
            return Deadline.after_ms(env.deadline_ms - margin - time.time_ns() / 1e6)
        margin = max(s.reply_margin_ms, s.reply_margin_fraction * s.step_timeout_ms)
        return Deadline.after_ms(s.step_timeout_ms - margin)

    async def decide(self, packet: pb.SystemStatePacket, deadline: Deadline) -> DecisionResult:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        view = self.catalog.view() if self.catalog is not None else CatalogView((), None, "no_catalog")
        live = self.live
        record: CullRecord | None = None
        try:
            _require_ids(packet)
            graph = self._build(packet, view.blueprints, timings)
            if self.heuristic is not None:
                decision = self.heuristic.decide(packet, seed_ids=graph.seed_ids, blueprint_ids=graph.blueprint_ids,
                                                 feature_coverage=graph.feature_coverage)
                if self.settings.enable_blend_mode_ann and decision.action == ACTION_GERMINATE:
                    annotate_blend_mode(decision, self.blend, None, policy_logits=[])  # as the GNN's
            else:
                record = self._observe_culls(packet)
                outputs = await self._infer(graph, deadline, timings, live.policy)
                decision = self._map(outputs, graph, live.version, _germinable(packet),
                                     frozenset(record.culled) if record is not None else frozenset())
        except DecisionFailed as f:
            return self._failure(packet, f, deadline, view, time.perf_counter() - t0, timings, live.version)
        self.inference_breaker.record_success()
        self.conservative.record_on_time()
        verdict = self._risk(packet, decision, view.blueprints)
        transitions = self._conservative_after(verdict)
        command = self._finalise(decision, verdict, graph, view, deadline)
        if command.command_type == pb.COMMAND_SEED and command.seed_operation.operation == pb.SEED_OP_GERMINATE:
            pair = (command.target_seed_id, command.seed_operation.blueprint_id)
            if record is not None:
                record.germinated(*pair)
            if self.explore is not None:
                self.grown[pair] = self.grown.get(pair, 0) + 1
        telemetry = self._command_telemetry(packet, decision, verdict, graph, view, transitions, timings, deadline)
        elapsed = time.perf_counter() - t0
        self.metrics.decision_latency.observe(elapsed)
        outcome = pb.CommandType.Name(command.command_type)
        self.metrics.decisions.labels(outcome).inc()
        self._count_decision()
        return DecisionResult(command, telemetry, outcome, timings)

    def _build(self, packet: pb.SystemStatePacket, blueprints: tuple[BlueprintInfo, ...],
               timings: dict[str, float]) -> GraphInputs:
        t = time.perf_counter()
        try:
            graph = self.builder.build(packet, blueprints)
        except DependencyViolationError as e:
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_DEPENDENCY_VIOLATION, str(e),
                                 event="dependency_violation", level=pb.TELEMETRY_LEVEL_ERROR) from e
        dt = time.perf_counter() - t
        timings["build_ms"] = dt * 1000.0
        self.metrics.build_latency.observe(dt)
        self.metrics.coverage.set(graph.feature_coverage)
        return graph

    async def _infer(self, graph: GraphInputs, deadline: Deadline, timings: dict[str, float],
                     policy: CompiledPolicy) -> PolicyOutputs:
        if not self.inference_breaker.allow():
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_BREAKER_OPEN,
                                 f"inference breaker open, retry in {self.inference_breaker.retry_after_s():.3f}s",
                                 event="inference_breaker_open")
        if self._inflight is not None and not self._inflight.done():
            # A symptom of the timeout already counted (its forward is still running): refuse fast
            # without counting it again, or one slow forward would cascade into an open breaker.
            self.metrics.timeouts.labels("busy").inc()
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE,
                                 "the previous inference is still running", event="timeout_inference")
        remaining = deadline.remaining_s()
        if remaining <= 0:
            self._timed_out("budget")
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE, "budget spent before inference",
                                 event="timeout_inference")
        loop = asyncio.get_running_loop()
        t = time.perf_counter()
        fut = loop.run_in_executor(self._executor, self._forward, graph, policy)
        self._inflight = fut
        try:
            async with asyncio.timeout(remaining):
                outputs = await asyncio.shield(fut)
        except TimeoutError as e:
            # The forward keeps running in its thread; its result is dropped when it lands.
            fut.add_done_callback(_discard)
            self._timed_out("inference")
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE,
                                 f"inference exceeded the {remaining * 1000:.2f} ms left of the budget",
                                 event="timeout_inference") from e
        except Exception as e:
            self.inference_breaker.record_failure()
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_INFERENCE_ERROR, f"inference failed: {e!r}",
                                 event="inference_error", level=pb.TELEMETRY_LEVEL_ERROR) from e
        dt = time.perf_counter() - t
        timings["inference_ms"] = dt * 1000.0
        self.metrics.inference_latency.observe(dt)
        return outputs

    def _timed_out(self, kind: str) -> None:
        self.metrics.timeouts.labels(kind).inc()
        self.inference_breaker.record_failure()
        self.conservative.record_timeout("timeout_inference")

    def _forward(self, graph: GraphInputs, policy: CompiledPolicy) -> PolicyOutputs:
        """Runs on the inference thread."""
        if self.faults.inference_delay_ms > 0:
            time.sleep(self.faults.inference_delay_ms / 1000.0)
        return policy(graph.x, graph.edge_index, graph.edge_attr, graph.counts)

    def _observe_culls(self, packet: pb.SystemStatePacket) -> CullRecord | None:
        if self.culls is None:
            return None
        record = self.culls(packet.training_run_id)
        record.observe(packet.seed_states)
        return record

    def _map(self, outputs: PolicyOutputs, graph: GraphInputs, policy_version: str,
             germinable: frozenset[str], culled: frozenset[tuple[str, str]]) -> PolicyDecision:
        try:
            decision = decide(outputs, graph, blend_mode_annotations=self.settings.enable_blend_mode_ann,
                              blend=self.blend, policy_version=policy_version, germinable=germinable,
                              culled=culled, explore=self.explore, explore_epsilon=self.settings.explore_epsilon,
                              tried=self.grown)
        except DependencyViolationError as e:
            raise DecisionFailed(pb.DECISION_FAILURE_REASON_DEPENDENCY_VIOLATION, str(e),
                                 event="dependency_violation", level=pb.TELEMETRY_LEVEL_ERROR) from e
        if culled:
            decision.command.annotations[CULLED_PAIRS_ANNOTATION] = encode_culled(culled)
        return decision

    def _risk(self, packet: pb.SystemStatePacket, decision: PolicyDecision,
              blueprints: tuple[BlueprintInfo, ...]) -> RiskVerdict:
        chosen = next((b for b in blueprints if b.blueprint_id == decision.blueprint_id), None)
        metrics = dict(packet.training_metrics)
        inputs = RiskInputs.from_blueprint(
            chosen if decision.command.command_type == pb.COMMAND_SEED else None,
            command_type=decision.command.command_type, policy_risk_score=decision.risk_score,
            conservative_mode=self.conservative.active, loss_delta=metrics.get("loss_delta"),
            training_metrics=metrics, global_step=packet.global_step,
            germinate_min_remaining_steps=self.settings.germinate_min_remaining_steps,
        )
        return evaluate(inputs)

    def _conservative_after(self, verdict: RiskVerdict) -> tuple[ConservativeTransition, ...]:
        self.conservative.record_verdict(verdict)
        self.conservative.maybe_exit()
        transitions = self.conservative.drain_transitions()
        self.metrics.conservative.set(1.0 if self.conservative.active else 0.0)
        return transitions

    def _finalise(self, decision: PolicyDecision, verdict: RiskVerdict, graph: GraphInputs, view: CatalogView,
                  deadline: Deadline) -> pb.AdaptationCommand:
        command = _apply_verdict(decision, verdict)
        command.version = 1
        command.command_id = new_message_id()
        command.issued_at.FromMilliseconds(now_ms())
        command.issued_by = f"tamiyo:{self.settings.instance_id}"
        command.execution_deadline_ms = max(0, int(deadline.remaining_ms()))
        a = command.annotations
        a["coverage_map"] = ",".join(f"{k}={v:.2f}" for k, v in sorted(graph.coverage.items()) if k.startswith(
            ("node.", "edges.")))
        a["metadata"] = "ok" if view.failure is None else f"unavailable:{view.failure}"
        if verdict.reason:
            a["risk_reason"] = verdict.reason
        return sign_command(command, self.keys)

    # -- failures and telemetry --------------------------------------------------------------------

    def _failure(self, packet: pb.SystemStatePacket, f: DecisionFailed, deadline: Deadline, view: CatalogView,
                 elapsed_s: float, timings: dict[str, float], policy_version: str) -> DecisionResult:
        reply = pb.DecisionFailure(
            version=1, packet_id=packet.packet_id, training_run_id=packet.training_run_id,
            global_step=packet.global_step, reason=f.reason, detail=f.detail[:500],
            issued_by=f"tamiyo:{self.settings.instance_id}", policy_version=policy_version,
        )
        reply.issued_at.FromMilliseconds(now_ms())
        reply.annotations["metadata"] = "ok" if view.failure is None else f"unavailable:{view.failure}"
        reason_name = pb.DecisionFailureReason.Name(f.reason).removeprefix("DECISION_FAILURE_REASON_").lower()
        event = build_event(f.event, level=f.level, description=f.detail[:200], reason=reason_name,
                            packet_id=packet.packet_id, step_index=packet.global_step)
        transitions = [t.to_event() for t in self.conservative.drain_transitions()]
        self.metrics.conservative.set(1.0 if self.conservative.active else 0.0)
        telemetry = functools.partial(
            build_telemetry_packet, "tamiyo", events=[event, *transitions],
            indicators={"reason": f.event, "step_index": str(packet.global_step), "policy_version": policy_version,
                        "timeout_budget_ms": f"{self.settings.step_timeout_ms:g}",
                        "metadata_timeout_budget_ms": f"{self.settings.metadata_timeout_ms:g}",
                        "training_run_id": packet.training_run_id},
        )
        self.metrics.decision_latency.observe(elapsed_s)
        self.metrics.decisions.labels(reason_name).inc()
        self._count_decision()
        return DecisionResult(reply, telemetry, reason_name, timings)

    def _command_telemetry(self, packet: pb.SystemStatePacket, decision: PolicyDecision, verdict: RiskVerdict,
                           graph: GraphInputs, view: CatalogView, transitions: tuple[ConservativeTransition, ...],
                           timings: Mapping[str, float], deadline: Deadline) -> Callable[[], pb.TelemetryPacket]:
        metrics = packet.training_metrics
        chosen = next((b for b in view.blueprints if b.blueprint_id == decision.blueprint_id), None)
        snapshot = DecisionSnapshot(
            step_index=packet.global_step, policy_version=decision.policy_version,
            validation_loss=float(packet.validation_loss), loss_delta=float(metrics.get("loss_delta", 0.0)),
            conservative_mode=self.conservative.active,
            inference_latency_ms=float(timings.get("inference_ms", 0.0)),
            timeout_budget_ms=self.settings.step_timeout_ms,
            metadata_timeout_budget_ms=self.settings.metadata_timeout_ms,
            feature_coverage={k: v for k, v in graph.coverage.items() if not k.startswith(("node.", "edges."))},
            coverage_types={k: v for k, v in graph.coverage.items() if k.startswith(("node.", "edges."))},
            value_estimate=decision.value_estimate, risk_score=decision.risk_score, risk_index=decision.risk_index,
            compile_enabled=bool(self.policy.compile_enabled), compile_warm_ms=self.policy.compile_warm_ms or None,
            compile_fallbacks=self.policy.compile_fallback_total,
            blueprint_risk=float(chosen.descriptor.risk) if chosen is not None else None,
            breaker_states={"inference": self.inference_breaker.state,
                            **({"metadata": self.catalog.breaker.state} if self.catalog is not None else {})},
            training_run_id=packet.training_run_id,
        )
        extra = []
        if view.failure is not None:
            extra.append(build_event("metadata_unavailable", level=pb.TELEMETRY_LEVEL_INFO,
                                     description=f"deciding without blueprint metadata: {view.failure}",
                                     reason=view.failure))
        return lambda: decision_telemetry(snapshot, verdict, transitions=transitions, extra_events=extra)

    def _count_decision(self) -> None:
        self.decisions += 1
        if self.faults.crash_after and self.decisions >= self.faults.crash_after:
            import os

            log.error("fault injection: crashing on purpose", decisions=self.decisions)
            os._exit(70)


def _require_ids(packet: pb.SystemStatePacket) -> None:
    missing = [n for n in ("packet_id", "training_run_id") if not getattr(packet, n)]
    if missing:
        raise DecisionFailed(pb.DECISION_FAILURE_REASON_DEPENDENCY_VIOLATION,
                             f"SystemStatePacket without {', '.join(missing)}", event="dependency_violation",
                             level=pb.TELEMETRY_LEVEL_ERROR)


def _apply_verdict(decision: PolicyDecision, verdict: RiskVerdict) -> pb.AdaptationCommand:
    """The policy's command, or the risk engine's PAUSE / OPTIMIZER replacement of it."""
    proposed = decision.command
    if verdict.command_type == proposed.command_type:
        out = pb.AdaptationCommand()
        out.CopyFrom(proposed)
        return out
    out = pb.AdaptationCommand(target_seed_id=proposed.target_seed_id)
    out.command_type = verdict.command_type  # type: ignore[assignment]  # the risk engine returns pb values
    out.annotations.update(proposed.annotations)
    out.annotations[POLICY_COMMAND_ANNOTATION] = pb.CommandType.Name(proposed.command_type)
    if verdict.command_type == pb.COMMAND_OPTIMIZER:
        out.optimizer_adjustment.optimizer_id = "sgd"
        out.optimizer_adjustment.hyperparameters["lr_delta"] = decision.param_delta
    return out


def _discard(fut: asyncio.Future[PolicyOutputs]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieve it so asyncio does not log "exception was never retrieved"

