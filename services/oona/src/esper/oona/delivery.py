"""What a handler receives: the verified envelope plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from esper.leyline import Lane, pb, unpack, unpack_as

M = TypeVar("M", bound=Message)


@dataclass(slots=True)
class Delivery:
    """One verified message. `deliveries` > 1 means a redelivery (crash, handler error, reclaim)."""

    envelope: pb.BusEnvelope
    channel: str
    stream: str
    entry_id: str
    lane: Lane
    deliveries: int = 1

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    @property
    def message_type(self) -> pb.BusMessageType.ValueType:
        return self.envelope.message_type

    def message(self) -> Message:
        """Decode the payload by its declared type (raises UndecodableError / UnknownTypeError)."""
        return unpack(self.envelope)

    def message_as(self, expected: type[M]) -> M:
        return unpack_as(self.envelope, expected)
