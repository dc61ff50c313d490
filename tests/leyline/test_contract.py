"""Leyline contract: enum names/numbers and message field numbers (REFERENCE_PROTOTYPE §2, ARCHITECTURE §3).

Everything is read from the generated DESCRIPTOR, so any renumbering or rename in leyline.proto
fails here before it reaches the wire.
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from esper.leyline import pb

# enum name -> (value prefix, {suffix: number}) exactly as the prototype lists them.
PROTOTYPE_ENUMS: dict[str, tuple[str, dict[str, int]]] = {
    "SeedLifecycleStage": ("SEED_STAGE_", {
        "DORMANT": 1, "GERMINATED": 2, "TRAINING": 3, "BLENDING": 4, "SHADOWING": 5, "PROBATIONARY": 6,
        "FOSSILIZED": 7, "CULLED": 8, "EMBARGOED": 9, "RESETTING": 10, "TERMINATED": 11,
    }),
    "SeedLifecycleGate": ("SEED_GATE_", {
        "G0_SANITY": 1, "G1_GRADIENT_HEALTH": 2, "G2_STABILITY": 3, "G3_INTERFACE": 4, "G4_SYSTEM_IMPACT": 5,
        "G5_RESET": 6,
    }),
    "HealthStatus": ("HEALTH_STATUS_", {"HEALTHY": 1, "DEGRADED": 2, "UNHEALTHY": 3, "CRITICAL": 4}),
    "CircuitBreakerState": ("CIRCUIT_STATE_", {"CLOSED": 1, "OPEN": 2, "HALF_OPEN": 3}),
    "CommandType": ("COMMAND_", {
        "SEED": 1, "ROLLBACK": 2, "OPTIMIZER": 3, "CIRCUIT_BREAKER": 4, "PAUSE": 5, "EMERGENCY": 6,
        "STRUCTURAL_PRUNING": 7,
    }),
    "SeedOperation": ("SEED_OP_", {
        "GERMINATE": 1, "START_TRAINING": 2, "START_GRAFTING": 3, "STABILIZE": 4, "EVALUATE": 5, "FINE_TUNE": 6,
        "FOSSILIZE": 7, "CULL": 8, "CANCEL": 9,
    }),
    "MessagePriority": ("MESSAGE_PRIORITY_", {"LOW": 1, "NORMAL": 2, "HIGH": 3, "CRITICAL": 4}),
    "DeliveryGuarantee": ("DELIVERY_GUARANTEE_", {"AT_LEAST_ONCE": 1, "AT_MOST_ONCE": 2, "EXACTLY_ONCE": 3}),
    "TelemetryLevel": ("TELEMETRY_LEVEL_", {"INFO": 1, "WARNING": 2, "ERROR": 3, "CRITICAL": 4}),
    "EmergencyLevel": ("EMERGENCY_LEVEL_", {"NOTICE": 1, "ELEVATED": 2, "CONSERVATIVE": 3, "HALT": 4}),
    "FieldReportOutcome": ("FIELD_REPORT_OUTCOME_", {"SUCCESS": 1, "NEUTRAL": 2, "REGRESSION": 3, "ABORTED": 4}),
    "BlueprintTier": ("BLUEPRINT_TIER_", {"SAFE": 1, "EXPERIMENTAL": 2, "HIGH_RISK": 3}),
    "BusMessageType": ("BUS_MESSAGE_TYPE_", {
        "SYSTEM_STATE": 1, "ADAPTATION_COMMAND": 2, "FIELD_REPORT": 3, "TELEMETRY": 4, "POLICY_UPDATE": 5,
        "KERNEL_PREFETCH_REQUEST": 6, "KERNEL_PREFETCH_READY": 7, "KERNEL_PREFETCH_ERROR": 8,
        "KERNEL_CATALOG_UPDATE": 9, "EMERGENCY_SIGNAL": 10, "BSDS_ISSUED": 20, "BSDS_FAILED": 21,
        "BENCHMARK_REPORT": 22,
    }),
    "HazardBand": ("HAZARD_BAND_", {"LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}),
    "HandlingClass": ("HANDLING_CLASS_", {"STANDARD": 1, "RESTRICTED": 2, "QUARANTINE": 3}),
    "ResourceProfile": ("RESOURCE_PROFILE_", {"CPU": 1, "GPU": 2, "MEMORY_HEAVY": 3, "IO_HEAVY": 4, "MIXED": 5}),
    "Provenance": ("PROVENANCE_", {"URABRASK": 1, "CURATED": 2, "HEURISTIC": 3, "EXTERNAL": 4}),
}

# Messages whose fields the prototype lists in field-number order starting at 1.
SEQUENTIAL_MESSAGES: dict[str, list[str]] = {
    "SeedState": ["seed_id", "stage", "gradient_norm", "learning_rate", "layer_depth", "metrics", "age_epochs",
                  "risk_score"],
    "HardwareContext": ["device_type", "device_id", "total_memory_gb", "available_memory_gb",
                        "temperature_celsius", "utilization_percent", "compute_capability"],
    "SystemStatePacket": ["version", "current_epoch", "validation_accuracy", "validation_loss", "timestamp_ns",
                          "hardware_context", "training_metrics", "seed_states", "packet_id", "global_step",
                          "training_loss", "source_subsystem", "training_run_id", "experiment_name"],
    "CommandSeedOperation": ["operation", "blueprint_id", "parameters"],
    "CommandOptimizerAdjustment": ["optimizer_id", "hyperparameters"],
    "CommandCircuitBreaker": ["desired_state", "rationale"],
    "EmergencySignal": ["version", "level", "reason", "origin", "triggered_at", "monotonic_time_ms", "run_id",
                        "attributes", "payload_checksum"],
    "KernelPrefetchRequest": ["request_id", "blueprint_id", "training_run_id", "issued_at"],
    "KernelArtifactReady": ["request_id", "blueprint_id", "artifact_ref", "checksum", "guard_digest",
                            "prewarm_p50_ms", "prewarm_p95_ms"],
    "KernelArtifactError": ["request_id", "blueprint_id", "reason"],
    "KernelCatalogUpdate": ["blueprint_id", "artifact_ref", "checksum", "guard_digest", "compile_ms", "prewarm_ms"],
    "FieldReport": ["version", "report_id", "command_id", "training_run_id", "seed_id", "blueprint_id", "outcome",
                    "metrics", "observation_window_epochs", "issued_at", "tamiyo_policy_version",
                    "follow_up_actions", "notes", "observation", "command"],  # 14, 15: Simic's training data
    "MitigationAction": ["action_type", "rationale"],
    "BlueprintDescriptor": ["blueprint_id", "name", "tier", "allowed_parameters", "risk", "stage",
                            "quarantine_only", "approval_required", "description"],
    "ParameterRange": ["min_value", "max_value"],
    "PolicyUpdate": ["version", "policy_id", "training_run_id", "issued_at", "tamiyo_policy_version", "payload"],
    "MetricPoint": ["name", "value", "unit", "attributes"],
    "TelemetryEvent": ["event_id", "description", "level", "attributes"],
    "TraceSpan": ["span_id", "parent_span_id", "name", "start_time", "end_time", "attributes"],
    "SystemHealth": ["status", "summary", "indicators"],
    "EventEnvelope": ["event_id", "event_type", "source_subsystem", "created_at", "processing_deadline", "ttl",
                      "payload", "payload_type", "content_encoding", "priority", "routing_keys", "correlation_id",
                      "delivery_guarantee", "max_attempts", "current_attempt"],
    "BSDS": ["version", "blueprint_id", "risk_score", "hazard_band", "handling_class", "resource_profile",
             "recommendation", "issued_at", "provenance"],
    "BenchmarkProfile": ["name", "p50_latency_ms", "p95_latency_ms", "throughput_samples_per_s"],
    "BlueprintBenchmark": ["version", "blueprint_id", "profiles", "device", "torch_version"],
    "BSDSIssued": ["bsds"],
    "BSDSFailed": ["blueprint_id", "reason"],
    "BenchmarkReport": ["benchmark"],
    # Prototype fields 1-3, then the fleet's routing/signing fields (ARCHITECTURE §3).
    "BusEnvelope": ["message_type", "payload", "attributes", "message_id", "correlation_id", "reply_to", "sender",
                    "issued_at_ms", "deadline_ms", "priority", "attempt", "key_id", "signature"],
}


def _message(name: str) -> Descriptor:
    return pb.DESCRIPTOR.message_types_by_name[name]


def _numbers(desc: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in desc.fields}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _mt(field: FieldDescriptor) -> Descriptor:
    """The message type of a message/map field (fails the test when the field is a scalar)."""
    assert field.message_type is not None, f"{field.full_name} is not a message field"
    return field.message_type


def _et(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, f"{field.full_name} is not an enum field"
    return field.enum_type


def test_package_name() -> None:
    assert pb.DESCRIPTOR.package == "esper.leyline.v1"


@pytest.mark.parametrize("enum_name", sorted(PROTOTYPE_ENUMS))
def test_prototype_enum_names_and_numbers(enum_name: str) -> None:
    prefix, values = PROTOTYPE_ENUMS[enum_name]
    desc: EnumDescriptor = pb.DESCRIPTOR.enum_types_by_name[enum_name]
    by_name = {v.name: v.number for v in desc.values}
    for suffix, number in values.items():
        name = prefix + suffix
        assert by_name.get(name) == number, f"{enum_name}.{name} must be {number}, found {by_name.get(name)}"
        # Name() round trip: no alias or other name holds that number.
        assert desc.values_by_number[number].name == name


@pytest.mark.parametrize("enum_name", sorted(pb.DESCRIPTOR.enum_types_by_name))
def test_every_enum_zero_is_unknown_or_unspecified(enum_name: str) -> None:
    desc = pb.DESCRIPTOR.enum_types_by_name[enum_name]
    zero = desc.values_by_number[0].name
    assert zero.endswith(("_UNKNOWN", "_UNSPECIFIED")), f"{enum_name} value 0 is {zero}"
    assert desc.values[0].number == 0, "value 0 must be declared first"
    prefix = PROTOTYPE_ENUMS.get(enum_name, (None, {}))[0]
    if prefix is not None:
        assert zero.startswith(prefix)


def test_enum_spot_checks_via_module_api() -> None:
    assert pb.SeedLifecycleStage.Value("SEED_STAGE_FOSSILIZED") == 7
    assert pb.SeedLifecycleStage.Name(pb.SEED_STAGE_TERMINATED) == "SEED_STAGE_TERMINATED"
    assert int(pb.SEED_STAGE_TERMINATED) == 11
    assert pb.BusMessageType.Value("BUS_MESSAGE_TYPE_BSDS_ISSUED") == 20
    assert pb.BusMessageType.Value("BUS_MESSAGE_TYPE_BENCHMARK_REPORT") == 22
    assert pb.SeedLifecycleGate.Value("SEED_GATE_G5_RESET") == 6
    assert pb.CommandType.Value("COMMAND_STRUCTURAL_PRUNING") == 7
    assert pb.EmergencyLevel.Value("EMERGENCY_LEVEL_HALT") == 4
    assert pb.MessagePriority.Value("MESSAGE_PRIORITY_CRITICAL") == 4


def test_enums_have_no_aliases() -> None:
    for name, desc in pb.DESCRIPTOR.enum_types_by_name.items():
        numbers = [v.number for v in desc.values]
        assert len(numbers) == len(set(numbers)), f"{name} reuses a number"


@pytest.mark.parametrize("message_name", sorted(SEQUENTIAL_MESSAGES))
def test_field_numbers_in_listed_order(message_name: str) -> None:
    expected = {name: i for i, name in enumerate(SEQUENTIAL_MESSAGES[message_name], start=1)}
    desc = _message(message_name)
    for name, number in expected.items():
        assert name in desc.fields_by_name, f"{message_name}.{name} is missing"
        assert desc.fields_by_name[name].number == number, (
            f"{message_name}.{name} is field {desc.fields_by_name[name].number}, expected {number}"
        )


def test_system_state_packet_exact_fields_and_reserved_range() -> None:
    desc = pb.SystemStatePacket.DESCRIPTOR
    assert _numbers(desc) == {n: i for i, n in enumerate(SEQUENTIAL_MESSAGES["SystemStatePacket"], start=1)}
    proto = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(proto)
    reserved = [(r.start, r.end) for r in proto.reserved_range]  # end is exclusive
    assert (100, 200) in reserved, f"SystemStatePacket must reserve 100-199, has {reserved}"
    tm = desc.fields_by_name["training_metrics"]
    assert _is_map(tm)
    assert _mt(tm).fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    assert _mt(tm).fields_by_name["value"].type == FieldDescriptor.TYPE_FLOAT
    seeds = desc.fields_by_name["seed_states"]
    assert seeds.is_repeated
    assert _mt(seeds).full_name == "esper.leyline.v1.SeedState"


def test_adaptation_command_fields_oneof_and_annotations() -> None:
    desc = pb.AdaptationCommand.DESCRIPTOR
    head = ["version", "command_id", "command_type", "target_seed_id", "execution_deadline_ms", "issued_at",
            "issued_by"]
    for i, name in enumerate(head, start=1):
        assert desc.fields_by_name[name].number == i, name
    oneof = desc.oneofs_by_name["payload"]
    members = {f.name: (f.number, _mt(f).full_name) for f in oneof.fields}
    assert members == {
        "seed_operation": (10, "esper.leyline.v1.CommandSeedOperation"),
        "optimizer_adjustment": (11, "esper.leyline.v1.CommandOptimizerAdjustment"),
        "circuit_breaker": (12, "esper.leyline.v1.CommandCircuitBreaker"),
        "rollback_payload": (13, "google.protobuf.Struct"),
    }
    annotations = desc.fields_by_name["annotations"]
    assert annotations.number == 20
    assert annotations.containing_oneof is None
    assert _is_map(annotations)
    assert _mt(annotations).fields_by_name["value"].type == FieldDescriptor.TYPE_STRING
    assert _mt(desc.fields_by_name["issued_at"]).full_name == "google.protobuf.Timestamp"


def test_telemetry_packet_field_numbers() -> None:
    assert _numbers(pb.TelemetryPacket.DESCRIPTOR) == {
        "packet_id": 1, "timestamp": 2, "source_subsystem": 3, "level": 4,
        "metrics": 10, "events": 20, "spans": 30, "system_health": 40,
    }
    fields = pb.TelemetryPacket.DESCRIPTOR.fields_by_name
    assert _mt(fields["metrics"]).name == "MetricPoint"
    assert _mt(fields["events"]).name == "TelemetryEvent"
    assert _mt(fields["spans"]).name == "TraceSpan"
    assert _mt(fields["system_health"]).name == "SystemHealth"
    assert pb.MetricPoint.DESCRIPTOR.fields_by_name["value"].type == FieldDescriptor.TYPE_DOUBLE


def test_field_report_exact_fields() -> None:
    assert _numbers(pb.FieldReport.DESCRIPTOR) == {
        n: i for i, n in enumerate(SEQUENTIAL_MESSAGES["FieldReport"], start=1)
    }
    follow = pb.FieldReport.DESCRIPTOR.fields_by_name["follow_up_actions"]
    assert follow.is_repeated
    assert _mt(follow).name == "MitigationAction"
    fields = pb.FieldReport.DESCRIPTOR.fields_by_name
    assert _mt(fields["observation"]).name == "SystemStatePacket"
    assert _mt(fields["command"]).name == "AdaptationCommand"


def test_bus_envelope_prototype_fields_and_signature_type() -> None:
    fields = pb.BusEnvelope.DESCRIPTOR.fields_by_name
    assert fields["message_type"].number == 1
    assert _et(fields["message_type"]).name == "BusMessageType"
    assert fields["payload"].number == 2
    assert fields["payload"].type == FieldDescriptor.TYPE_BYTES
    assert fields["attributes"].number == 3
    assert _is_map(fields["attributes"])
    assert fields["signature"].type == FieldDescriptor.TYPE_BYTES
    assert _et(fields["priority"]).name == "MessagePriority"
    assert _numbers(pb.BusEnvelope.DESCRIPTOR) == {
        n: i for i, n in enumerate(SEQUENTIAL_MESSAGES["BusEnvelope"], start=1)
    }


def test_dead_letter_reasons_cover_every_rejection() -> None:
    names = set(pb.DeadLetterReason.keys())
    for suffix in ("UNDECODABLE", "OVERSIZE", "MISSING_SIGNATURE", "BAD_SIGNATURE", "UNKNOWN_KEY", "STALE",
                   "FROM_FUTURE", "EXPIRED", "REPLAYED", "MISSING_ID", "MAX_DELIVERIES", "HANDLER_REJECTED",
                   "UNKNOWN_TYPE"):
        assert f"DEAD_LETTER_REASON_{suffix}" in names
