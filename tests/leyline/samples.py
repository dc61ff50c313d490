"""Shared test data for the Leyline tests: one populated payload per bus message type, and keys."""

from __future__ import annotations

from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from esper.leyline import SigningKeys, pb

NOW_MS = 1_700_000_000_000
KEYS = SigningKeys("k1", b"0123456789abcdef0123456789abcdef")


def ts(seconds: int = 1_700_000_000, nanos: int = 123_000_000) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def sample_payloads() -> dict[pb.BusMessageType.ValueType, Message]:
    """A non-trivial instance of every bus payload (floats exactly representable in float32)."""
    return {
        pb.BUS_MESSAGE_TYPE_SYSTEM_STATE: pb.SystemStatePacket(
            version=1,
            current_epoch=3,
            validation_accuracy=0.5,
            validation_loss=1.25,
            timestamp_ns=1_700_000_000_123_456_789,
            hardware_context=pb.HardwareContext(device_type="cuda", device_id="0", total_memory_gb=80.0),
            training_metrics={"loss": 0.5, "samples_per_s": 1024.0},
            seed_states=[pb.SeedState(seed_id="s1", stage=pb.SEED_STAGE_TRAINING, metrics={"alpha": 0.25})],
            packet_id="p1",
            global_step=42,
            training_loss=0.75,
            source_subsystem="tolaria",
            training_run_id="run1",
            experiment_name="exp",
        ),
        pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: pb.AdaptationCommand(
            version=1,
            command_id="c1",
            command_type=pb.COMMAND_SEED,
            target_seed_id="s1",
            execution_deadline_ms=5,
            issued_at=ts(),
            issued_by="tamiyo",
            seed_operation=pb.CommandSeedOperation(
                operation=pb.SEED_OP_GERMINATE, blueprint_id="bp1", parameters={"alpha": 0.5}
            ),
            annotations={"signature": "sig"},
        ),
        pb.BUS_MESSAGE_TYPE_FIELD_REPORT: pb.FieldReport(
            version=1,
            report_id="r1",
            command_id="c1",
            training_run_id="run1",
            seed_id="s1",
            blueprint_id="bp1",
            outcome=pb.FIELD_REPORT_OUTCOME_REGRESSION,
            metrics={"delta": -0.5},
            observation_window_epochs=2,
            issued_at=ts(),
            tamiyo_policy_version="v3",
            follow_up_actions=[pb.MitigationAction(action_type="CONSERVATIVE_MODE", rationale="loss spike")],
            notes="n",
        ),
        pb.BUS_MESSAGE_TYPE_TELEMETRY: pb.TelemetryPacket(
            packet_id="t1",
            timestamp=ts(),
            source_subsystem="kasmina",
            level=pb.TELEMETRY_LEVEL_WARNING,
            metrics=[pb.MetricPoint(name="latency", value=1.5, unit="ms", attributes={"k": "v"})],
            events=[pb.TelemetryEvent(event_id="e1", description="d", level=pb.TELEMETRY_LEVEL_ERROR)],
            spans=[pb.TraceSpan(span_id="sp", parent_span_id="pp", name="step", start_time=ts(), end_time=ts())],
            system_health=pb.SystemHealth(status=pb.HEALTH_STATUS_DEGRADED, summary="s", indicators={"gpu": "hot"}),
        ),
        pb.BUS_MESSAGE_TYPE_POLICY_UPDATE: pb.PolicyUpdate(
            version=1,
            policy_id="pol",
            training_run_id="run1",
            issued_at=ts(),
            tamiyo_policy_version="v4",
            payload=bytes(range(256)),
        ),
        pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST: pb.KernelPrefetchRequest(
            request_id="rq", blueprint_id="bp1", training_run_id="run1", issued_at=ts()
        ),
        pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: pb.KernelArtifactReady(
            request_id="rq",
            blueprint_id="bp1",
            artifact_ref="urza://bp1",
            checksum="abc",
            guard_digest="def",
            prewarm_p50_ms=1.5,
            prewarm_p95_ms=2.5,
        ),
        pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR: pb.KernelArtifactError(
            request_id="rq", blueprint_id="bp1", reason="compile failed"
        ),
        pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE: pb.KernelCatalogUpdate(
            blueprint_id="bp1", artifact_ref="urza://bp1", checksum="abc", guard_digest="def", compile_ms=10.0,
            prewarm_ms=2.0,
        ),
        pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: pb.EmergencySignal(
            version=1,
            level=pb.EMERGENCY_LEVEL_HALT,
            reason="nan loss",
            origin="tolaria",
            triggered_at=ts(),
            monotonic_time_ms=12345,
            run_id="run1",
            attributes={"step": "42"},
            payload_checksum=b"\x00\xff\x10",
        ),
        pb.BUS_MESSAGE_TYPE_DECISION_FAILURE: pb.DecisionFailure(
            version=1,
            packet_id="p1",
            training_run_id="run1",
            global_step=42,
            reason=pb.DECISION_FAILURE_REASON_TIMEOUT_INFERENCE,
            detail="gnn took 9 ms",
            issued_at=ts(),
            issued_by="tamiyo-0",
            policy_version="v4",
            annotations={"a": "b"},
        ),
        pb.BUS_MESSAGE_TYPE_DEAD_LETTER: pb.DeadLetterRecord(
            reason=pb.DEAD_LETTER_REASON_BAD_SIGNATURE,
            detail="signature mismatch",
            source_stream="oona.{state}",
            source_entry_id="1-0",
            group="tamiyo",
            consumer="tamiyo-0",
            deliveries=1,
            dead_at_ms=NOW_MS,
            raw_payload=b"\x01\x02",
            message_id="m1",
            message_type=pb.BUS_MESSAGE_TYPE_SYSTEM_STATE,
        ),
        pb.BUS_MESSAGE_TYPE_BLUEPRINT_QUERY: pb.BlueprintQuery(
            request_id="q1", blueprint_ids=["bp1"], include_graph=True, training_run_id="run1"
        ),
        pb.BUS_MESSAGE_TYPE_BLUEPRINT_CATALOG: pb.BlueprintCatalog(
            request_id="q1",
            issued_at=ts(),
            entries=[
                pb.BlueprintCatalogEntry(
                    descriptor=pb.BlueprintDescriptor(blueprint_id="bp1", name="residual_mlp",
                                                      tier=pb.BLUEPRINT_TIER_SAFE, risk=0.1),
                    graph=pb.BlueprintGraph(
                        layers=[pb.BlueprintLayer(layer_type="linear", depth=1.0, latency_ms=0.2)],
                        activations=[pb.BlueprintActivation(activation_type="relu", saturation=0.1)],
                        parameters=[pb.BlueprintParameter(name="alpha", min_value=0.0, max_value=1.0)],
                        adjacency=[pb.LayerEdge(src=0, dst=0)],
                        monitored_layers=[0],
                        blend_methods=["linear"],
                        candidate_score=0.5,
                    ),
                )
            ],
        ),
        pb.BUS_MESSAGE_TYPE_BSDS_ISSUED: pb.BSDSIssued(
            bsds=pb.BSDS(
                version=1,
                blueprint_id="bp1",
                risk_score=0.25,
                hazard_band=pb.HAZARD_BAND_HIGH,
                handling_class=pb.HANDLING_CLASS_RESTRICTED,
                resource_profile=pb.RESOURCE_PROFILE_GPU,
                recommendation="shadow first",
                issued_at=ts(),
                provenance=pb.PROVENANCE_URABRASK,
            )
        ),
        pb.BUS_MESSAGE_TYPE_BSDS_FAILED: pb.BSDSFailed(blueprint_id="bp1", reason="timeout"),
        pb.BUS_MESSAGE_TYPE_BENCHMARK_REPORT: pb.BenchmarkReport(
            benchmark=pb.BlueprintBenchmark(
                version=1,
                blueprint_id="bp1",
                profiles=[pb.BenchmarkProfile(name="b32", p50_latency_ms=1.0, p95_latency_ms=2.0,
                                              throughput_samples_per_s=512.0)],
                device="h100",
                torch_version="2.5",
            )
        ),
    }


def command_variants() -> list[pb.AdaptationCommand]:
    """One AdaptationCommand per `payload` oneof member."""
    rollback = Struct()
    rollback.update({"checkpoint": "ck-7", "steps": 3.0, "nested": {"ok": True}})
    return [
        pb.AdaptationCommand(command_id="c-seed", command_type=pb.COMMAND_SEED,
                             seed_operation=pb.CommandSeedOperation(operation=pb.SEED_OP_CULL)),
        pb.AdaptationCommand(command_id="c-opt", command_type=pb.COMMAND_OPTIMIZER,
                             optimizer_adjustment=pb.CommandOptimizerAdjustment(optimizer_id="adam",
                                                                                 hyperparameters={"lr": 0.5})),
        pb.AdaptationCommand(command_id="c-cb", command_type=pb.COMMAND_CIRCUIT_BREAKER,
                             circuit_breaker=pb.CommandCircuitBreaker(desired_state=pb.CIRCUIT_STATE_OPEN,
                                                                      rationale="r")),
        pb.AdaptationCommand(command_id="c-rb", command_type=pb.COMMAND_ROLLBACK, rollback_payload=rollback),
    ]
