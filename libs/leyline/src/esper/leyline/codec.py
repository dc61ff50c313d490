"""Envelope encode/decode with the size cap checked before any parsing.

A stream entry is untrusted bytes: we refuse oversize input by length alone, parse only the
envelope (cheap, bounded), and decode the inner payload lazily with `unpack` once the signature
and freshness checks have passed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from esper.leyline._generated import leyline_pb2 as pb
from esper.leyline.errors import MissingIdError, OversizeError, UndecodableError, UnknownTypeError

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a SystemStatePacket is ~1 KiB, a PolicyUpdate a few hundred KiB.

# BusMessageType → payload class. The single source for "what does this type carry".
PAYLOAD_TYPES: Mapping[pb.BusMessageType.ValueType, type[Message]] = {
    pb.BUS_MESSAGE_TYPE_SYSTEM_STATE: pb.SystemStatePacket,
    pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: pb.AdaptationCommand,
    pb.BUS_MESSAGE_TYPE_FIELD_REPORT: pb.FieldReport,
    pb.BUS_MESSAGE_TYPE_TELEMETRY: pb.TelemetryPacket,
    pb.BUS_MESSAGE_TYPE_POLICY_UPDATE: pb.PolicyUpdate,
    pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST: pb.KernelPrefetchRequest,
    pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: pb.KernelArtifactReady,
    pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR: pb.KernelArtifactError,
    pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE: pb.KernelCatalogUpdate,
    pb.BUS_MESSAGE_TYPE_EMERGENCY_SIGNAL: pb.EmergencySignal,
    pb.BUS_MESSAGE_TYPE_DECISION_FAILURE: pb.DecisionFailure,
    pb.BUS_MESSAGE_TYPE_DEAD_LETTER: pb.DeadLetterRecord,
    pb.BUS_MESSAGE_TYPE_BLUEPRINT_QUERY: pb.BlueprintQuery,
    pb.BUS_MESSAGE_TYPE_BLUEPRINT_CATALOG: pb.BlueprintCatalog,
    pb.BUS_MESSAGE_TYPE_BSDS_ISSUED: pb.BSDSIssued,
    pb.BUS_MESSAGE_TYPE_BSDS_FAILED: pb.BSDSFailed,
    pb.BUS_MESSAGE_TYPE_BENCHMARK_REPORT: pb.BenchmarkReport,
}
_TYPE_BY_NAME: Mapping[str, pb.BusMessageType.ValueType] = {
    cls.DESCRIPTOR.full_name: t for t, cls in PAYLOAD_TYPES.items()
}

M = TypeVar("M", bound=Message)


def message_type_of(message: Message) -> pb.BusMessageType.ValueType:
    """The BusMessageType for a payload instance; a type not on the bus is a programming error."""
    try:
        return _TYPE_BY_NAME[message.DESCRIPTOR.full_name]
    except KeyError as e:
        raise UnknownTypeError(f"{message.DESCRIPTOR.full_name} is not a bus payload") from e


class _EnumWrapper(Protocol):
    def Name(self, number: Any) -> str: ...  # protobuf's spelling


def enum_name(enum: _EnumWrapper, value: int) -> str:
    """`enum.Name(value)`, or `UNKNOWN_<value>` for a number this schema does not define. Proto3 keeps
    unknown enum numbers (a newer peer's, or a forged message's) and `Name` raises on them; naming a
    value in a rejection, a log line or a counter must not be what crashes a service."""
    try:
        return enum.Name(value)
    except ValueError:
        return f"UNKNOWN_{value}"


def new_message_id() -> str:
    """128 random bits as hex: what uuid4().hex carries, at a quarter of its cost (hot path)."""
    return os.urandom(16).hex()


def pack(
    message: Message,
    *,
    sender: str,
    issued_at_ms: int,
    priority: pb.MessagePriority.ValueType = pb.MESSAGE_PRIORITY_NORMAL,
    message_id: str | None = None,
    correlation_id: str = "",
    reply_to: str = "",
    deadline_ms: int = 0,
    attributes: Mapping[str, str] | None = None,
) -> pb.BusEnvelope:
    """Wrap a payload in an (unsigned) envelope."""
    env = pb.BusEnvelope(
        message_type=message_type_of(message),
        payload=message.SerializeToString(deterministic=True),
        message_id=message_id or new_message_id(),
        correlation_id=correlation_id,
        reply_to=reply_to,
        sender=sender,
        issued_at_ms=issued_at_ms,
        deadline_ms=deadline_ms,
        priority=priority,
    )
    if attributes:
        env.attributes.update(attributes)
    return env


def encode_envelope(env: pb.BusEnvelope) -> bytes:
    return env.SerializeToString(deterministic=True)


def decode_envelope(raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> pb.BusEnvelope:
    """Parse untrusted bytes into an envelope: length first, then structure, then required ids."""
    if len(raw) > max_bytes:
        raise OversizeError(f"entry is {len(raw)} bytes, cap is {max_bytes}")
    env = pb.BusEnvelope()
    try:
        env.ParseFromString(raw)
    except (DecodeError, ValueError, RuntimeError) as e:  # upb raises DecodeError; be explicit about the rest
        raise UndecodableError(f"envelope does not parse: {e}") from e
    if not env.message_id:
        raise MissingIdError("envelope has no message_id")
    return env


def unpack(env: pb.BusEnvelope, expected: type[M] | None = None) -> Message:
    """Decode the payload by its declared type (and check it is the one the caller expects)."""
    cls = PAYLOAD_TYPES.get(env.message_type)
    if cls is None:
        raise UnknownTypeError(f"message_type {env.message_type} has no payload class")
    if expected is not None and cls is not expected:
        raise UnknownTypeError(f"expected {expected.DESCRIPTOR.name}, envelope carries {cls.DESCRIPTOR.name}")
    msg = cls()
    try:
        msg.ParseFromString(env.payload)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise UndecodableError(f"{cls.DESCRIPTOR.name} payload does not parse: {e}") from e
    return msg


def unpack_as(env: pb.BusEnvelope, expected: type[M]) -> M:
    """Typed variant of `unpack` for callers that know what they asked for."""
    msg = unpack(env, expected)
    assert isinstance(msg, expected)
    return msg
