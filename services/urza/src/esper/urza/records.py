"""Catalogue rows ↔ Leyline messages: small pure functions, no IO (the library does the IO)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from esper.leyline import pb
from esper.urza.errors import CatalogRowError

__all__ = [
    "KernelRecord",
    "catalog_update",
    "decode_extras",
    "encode_extras",
    "entry_from_row",
    "from_json_dict",
    "ready_message",
    "record_from_row",
    "to_json_dict",
]

# Column order of every `SELECT ... FROM kernels` (see `record_from_row`).
KERNEL_COLUMNS = ("kernel_id, blueprint_id, slot, artifact_ref, checksum, guard_digest, compile_ms, "
                  "prewarm_p50_ms, prewarm_p95_ms, registered_at_ms")


@dataclass(frozen=True, slots=True)
class KernelRecord:
    """One compiled kernel: a blueprint's artifact for one slot shape, plus its compile/prewarm timings."""

    kernel_id: str
    blueprint_id: str
    slot: str
    artifact_ref: str
    checksum: str
    guard_digest: str
    compile_ms: float
    prewarm_p50_ms: float
    prewarm_p95_ms: float
    registered_at_ms: int


def record_from_row(row: tuple[Any, ...]) -> KernelRecord:
    kid, bid, slot, ref, digest, guard, compile_ms, p50, p95, at = row
    return KernelRecord(kernel_id=str(kid), blueprint_id=str(bid), slot=str(slot), artifact_ref=str(ref),
                        checksum=str(digest), guard_digest=str(guard), compile_ms=float(compile_ms),
                        prewarm_p50_ms=float(p50), prewarm_p95_ms=float(p95), registered_at_ms=int(at))


def check_timing(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative number of ms, got {value}")
    return value


def ready_message(record: KernelRecord, *, request_id: str, blueprint_id: str) -> pb.KernelArtifactReady:
    """The reply to a prefetch request; `blueprint_id` echoes what the request asked for."""
    return pb.KernelArtifactReady(request_id=request_id, blueprint_id=blueprint_id,
                                  artifact_ref=record.artifact_ref, checksum=record.checksum,
                                  guard_digest=record.guard_digest, prewarm_p50_ms=record.prewarm_p50_ms,
                                  prewarm_p95_ms=record.prewarm_p95_ms)


def catalog_update(record: KernelRecord) -> pb.KernelCatalogUpdate:
    """What Tezzeret announces on `kernel.ready` after registering a kernel (blueprint_id = kernel id)."""
    return pb.KernelCatalogUpdate(blueprint_id=record.kernel_id, artifact_ref=record.artifact_ref,
                                  checksum=record.checksum, guard_digest=record.guard_digest,
                                  compile_ms=record.compile_ms, prewarm_ms=record.prewarm_p50_ms)


# -- blueprint rows --------------------------------------------------------------------------------


def to_json_dict(message: Any) -> dict[str, Any]:
    """A Leyline message as the JSON object stored in `extras` (proto field names)."""
    out: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return out


def from_json_dict(value: object, cls: type[Any], what: str) -> Any:
    if not isinstance(value, dict):
        raise CatalogRowError(f"extras[{what!r}] is not a JSON object")
    try:
        return json_format.ParseDict(value, cls())
    except json_format.ParseError as e:
        raise CatalogRowError(f"extras[{what!r}] does not parse as {cls.__name__}: {e}") from e


def encode_extras(extras: Mapping[str, Any]) -> str:
    return orjson.dumps(dict(extras), option=orjson.OPT_SORT_KEYS).decode()


def decode_extras(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise CatalogRowError(f"extras is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise CatalogRowError("extras is not a JSON object")
    return value


def decode_descriptor(blob: bytes) -> pb.BlueprintDescriptor:
    try:
        return pb.BlueprintDescriptor.FromString(blob)
    except DecodeError as e:
        raise CatalogRowError(f"descriptor does not decode: {e}") from e


def entry_from_row(descriptor: bytes, extras_text: str | None, *, include_graph: bool) -> pb.BlueprintCatalogEntry:
    """A catalogue entry: the descriptor, the BSDS when Urabrask issued one, the graph only when asked."""
    extras = decode_extras(extras_text)
    entry = pb.BlueprintCatalogEntry(descriptor=decode_descriptor(descriptor))
    if "bsds" in extras:
        entry.bsds.CopyFrom(from_json_dict(extras["bsds"], pb.BSDS, "bsds"))
    if include_graph and "graph" in extras:
        entry.graph.CopyFrom(from_json_dict(extras["graph"], pb.BlueprintGraph, "graph"))
    return entry
