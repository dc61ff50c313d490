"""Leyline: Esper's contracts. Generated protobuf code plus the few helpers every process needs to
put a message on the bus safely (codec with size cap, HMAC signing, freshness/replay, channels)."""

from esper.leyline._generated import leyline_pb2
from esper.leyline.channels import (
    CHANNELS,
    DEADLETTER_STREAM,
    LANES,
    Channel,
    Lane,
    channel,
    command_channel,
    is_emergency_priority,
    lane_for,
)
from esper.leyline.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PAYLOAD_TYPES,
    decode_envelope,
    encode_envelope,
    message_type_of,
    new_message_id,
    pack,
    unpack,
    unpack_as,
)
from esper.leyline.errors import (
    EnvelopeError,
    FreshnessError,
    LeylineError,
    MissingIdError,
    OversizeError,
    ReplayError,
    SignatureError,
    UndecodableError,
    UnknownTypeError,
    reason_code,
)
from esper.leyline.freshness import (
    DEFAULT_FRESHNESS_WINDOW_MS,
    DEFAULT_MAX_CLOCK_SKEW_MS,
    BoundedTTLMap,
    ReplayCache,
    check_freshness,
)
from esper.leyline.signing import (
    SigningKeys,
    hmac_sha256,
    sign_command,
    sign_envelope,
    verify_command,
    verify_envelope,
)

pb = leyline_pb2

__all__ = [
    "CHANNELS",
    "DEADLETTER_STREAM",
    "DEFAULT_FRESHNESS_WINDOW_MS",
    "DEFAULT_MAX_CLOCK_SKEW_MS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LANES",
    "PAYLOAD_TYPES",
    "BoundedTTLMap",
    "Channel",
    "EnvelopeError",
    "FreshnessError",
    "Lane",
    "LeylineError",
    "MissingIdError",
    "OversizeError",
    "ReplayCache",
    "ReplayError",
    "SignatureError",
    "SigningKeys",
    "UndecodableError",
    "UnknownTypeError",
    "channel",
    "check_freshness",
    "command_channel",
    "decode_envelope",
    "encode_envelope",
    "hmac_sha256",
    "is_emergency_priority",
    "lane_for",
    "leyline_pb2",
    "message_type_of",
    "new_message_id",
    "pack",
    "pb",
    "reason_code",
    "sign_command",
    "sign_envelope",
    "unpack",
    "unpack_as",
    "verify_command",
    "verify_envelope",
]
