"""Real telemetry packets, built the way the services build them.

Tamiyo's decision packets come from Tamiyo's own `decision_telemetry` (torch-free), so a change to
what Tamiyo sends shows up here. Tolaria and Kasmina packets need torch to build for real; they are
assembled with the same core builders and the metric/event names their code uses (trainer.py
`_publish_epoch_telemetry`, emergency.py `escalation_event`, kasmina.py `metrics` / `_emit`).
"""

from __future__ import annotations

from esper.core.telemetry import build_event, build_metric, build_telemetry_packet
from esper.leyline import pb
from esper.tamiyo.events import DecisionSnapshot, decision_telemetry
from esper.tamiyo.risk import REASON_CODES, RiskFinding, RiskVerdict

RUN = "run-1"


def finding(code: str, value: float = 1.0) -> RiskFinding:
    effect, level = REASON_CODES[code]
    return RiskFinding(code=code, effect=effect, level=level, signal=code, value=value, threshold=0.5, detail=code)


def decision(step: int, *, coverage: float = 0.9, inference_ms: float = 2.0, command: int = pb.COMMAND_SEED,
             findings: tuple[RiskFinding, ...] = (), blueprint_risk: float | None = 0.1,
             breaker: int = pb.CIRCUIT_STATE_CLOSED, run: str = RUN) -> pb.TelemetryPacket:
    """One of Tamiyo's per-decision packets (worker._command_telemetry → events.decision_telemetry)."""
    snapshot = DecisionSnapshot(
        step_index=step, policy_version="v1", validation_loss=0.5, loss_delta=0.0, conservative_mode=False,
        inference_latency_ms=inference_ms, timeout_budget_ms=5.0, metadata_timeout_budget_ms=25.0,
        feature_coverage={"loss": coverage, "gradient_norm": coverage}, blueprint_risk=blueprint_risk,
        breaker_states={"inference": breaker}, training_run_id=run,
    )
    verdict = RiskVerdict(proposed_command_type=command, command_type=command, findings=findings,
                          reason=findings[0].code if findings else None, enter_conservative=False,
                          conservative_reason=None)
    return decision_telemetry(snapshot, verdict)


def decision_failure(step: int, event: str = "timeout_inference", *, run: str = RUN) -> pb.TelemetryPacket:
    """Tamiyo's DecisionFailure telemetry (worker._failure)."""
    ev = build_event(event, level=pb.TELEMETRY_LEVEL_WARNING, description="inference over budget",
                     reason="timeout", packet_id=f"p{step}", step_index=step)
    return build_telemetry_packet("tamiyo", events=[ev], indicators={
        "reason": event, "step_index": str(step), "policy_version": "v1", "timeout_budget_ms": "5",
        "metadata_timeout_budget_ms": "25", "training_run_id": run})


def tolaria_event(name: str, level: int = pb.TELEMETRY_LEVEL_WARNING, **attributes: str | int) -> pb.TelemetryPacket:
    """A trainer event sent at once (trainer._event: WARNING and above)."""
    return build_telemetry_packet("tolaria", events=[build_event(name, level=level, description=name, **attributes)])


def escalation(level_to: int, *, halt: bool = False) -> pb.TelemetryEvent:
    """emergency.escalation_event."""
    return build_event("tolaria.emergency.halt" if halt else "tolaria.emergency.escalated",
                       level=pb.TELEMETRY_LEVEL_CRITICAL if halt else pb.TELEMETRY_LEVEL_WARNING,
                       level_from=0, level_to=level_to, reason="loss_spike")


def tolaria_epoch(epoch: int, *, accuracy: float = 0.8, val_loss: float = 0.4,
                  events: tuple[pb.TelemetryEvent, ...] = ()) -> pb.TelemetryPacket:
    """trainer._publish_epoch_telemetry: epoch metrics plus Kasmina's drained events."""
    metrics = [build_metric("tolaria.training.validation_loss", val_loss),
               build_metric("tolaria.training.accuracy", accuracy, unit="ratio"),
               build_metric("tolaria.epochs.total", float(epoch))]
    return build_telemetry_packet("tolaria", metrics=metrics, events=list(events))


def kasmina_census(seeds: dict[str, tuple[int, float]], *, violations: float = 0.0,
                   breaker: int | None = None) -> pb.TelemetryPacket:
    """kasmina.telemetry_packet(): per-seed points for every slot plus the global ones."""
    points = []
    for sid, (stage, alpha) in seeds.items():
        points += [build_metric("kasmina.seed.stage", float(stage), seed_id=sid),
                   build_metric("kasmina.seed.alpha", alpha, seed_id=sid),
                   build_metric("kasmina.seed.isolation_violations", 0.0, seed_id=sid)]
    points += [build_metric("kasmina.seeds.active", float(len(seeds))),
               build_metric("kasmina.seeds.fossilized", 0.0),
               build_metric("kasmina.isolation.violations", violations)]
    if breaker is not None:
        points.append(build_metric("kasmina.breaker.state", float(breaker)))
    return build_telemetry_packet("kasmina", metrics=points)


def seed_event(name: str, seed_id: str = "s0", level: int = pb.TELEMETRY_LEVEL_INFO) -> pb.TelemetryEvent:
    return build_event(name, level=level, seed_id=seed_id)


def field_report(report_id: str, outcome: int) -> pb.FieldReport:
    report = pb.FieldReport(version=1, report_id=report_id, command_id=f"c-{report_id}", training_run_id=RUN,
                            outcome=pb.FieldReportOutcome.ValueType(outcome))
    report.issued_at.GetCurrentTime()
    return report
