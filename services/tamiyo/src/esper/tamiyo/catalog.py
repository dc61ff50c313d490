"""Blueprint metadata for decisions: fetched from Urza in the background, never on the hot path.

The decision budget is a few milliseconds, while a metadata round trip may take tens (and forever
when no blueprint library runs). So a refresher task keeps a TTL cache filled with
`BlueprintQuery` → `BlueprintCatalog` over Oona request/reply; decisions read whatever is cached.
When no library answers the refresher reports an explicit `timeout_urza` failure (breaker, counter,
event) and decisions run with degraded coverage — there is no fake library and no invented data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from esper.core.breaker import CircuitBreaker
from esper.core.clock import sleep_or_stop
from esper.core.errors import BreakerOpenError, DependencyViolationError
from esper.core.logging import get_logger
from esper.leyline import EnvelopeError, new_message_id, pb
from esper.oona import OonaClient, OonaError
from esper.oona.errors import RequestTimeoutError
from esper.tamiyo.metadata import ActivationInfo, BlueprintInfo, LayerInfo, ParameterInfo

log = get_logger("esper.tamiyo.catalog")

QUERY_CHANNEL = "blueprint.query"


def _opt(msg: Message, field: str) -> float | None:
    """A proto3 `optional float`: its value when present, else None (absent is not zero)."""
    return float(getattr(msg, field)) if msg.HasField(field) else None


def blueprint_from_entry(entry: pb.BlueprintCatalogEntry) -> BlueprintInfo:
    """Leyline catalogue entry → BlueprintInfo; a missing blueprint id is a DependencyViolationError."""
    d = entry.descriptor
    if not d.blueprint_id:
        raise DependencyViolationError("catalogue entry without a blueprint_id")
    g = entry.graph
    return BlueprintInfo(
        descriptor=d,
        bsds=entry.bsds if entry.HasField("bsds") else None,
        layers=tuple(
            LayerInfo(type_name=x.layer_type, depth=_opt(x, "depth"), latency_ms=_opt(x, "latency_ms"),
                      parameter_count=_opt(x, "parameter_count"), dropout=_opt(x, "dropout"),
                      activation_name=x.activation, weight_norm=_opt(x, "weight_norm"),
                      gradient_norm=_opt(x, "gradient_norm"))
            for x in g.layers
        ),
        activations=tuple(
            ActivationInfo(type_name=a.activation_type, saturation=_opt(a, "saturation"),
                           gradient_flow=_opt(a, "gradient_flow"), cost=_opt(a, "cost"),
                           nonlinearity=_opt(a, "nonlinearity"))
            for a in g.activations
        ),
        parameters=tuple(
            ParameterInfo(name=p.name, min=_opt(p, "min_value"), max=_opt(p, "max_value"),
                          default=_opt(p, "default_value"))
            for p in g.parameters
        ),
        adjacency=tuple((e.src, e.dst) for e in g.adjacency),
        monitored_layers=tuple(g.monitored_layers),
        blend_methods=tuple(g.blend_methods),
        candidate_score=_opt(g, "candidate_score"),
    )


@dataclass(frozen=True, slots=True)
class CatalogView:
    """What a decision sees: the cached blueprints and, when there are none, why."""

    blueprints: tuple[BlueprintInfo, ...]
    age_s: float | None  # None: never fetched
    failure: str | None  # "timeout_urza", "breaker_open", "urza_error: ...", or None


class BlueprintCatalog:
    """TTL cache of Urza's catalogue plus the refresh logic (the IO is one request per refresh)."""

    def __init__(
        self,
        client: OonaClient,
        *,
        timeout_ms: float,
        ttl_s: float,
        breaker: CircuitBreaker,
        on_failure: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._timeout_ms = timeout_ms
        self._ttl_s = ttl_s
        self.breaker = breaker
        self._on_failure = on_failure
        self._clock = clock
        self._blueprints: tuple[BlueprintInfo, ...] = ()
        self._fetched_at: float | None = None
        self.last_failure: str | None = None
        self.failures = 0

    def view(self) -> CatalogView:
        age = None if self._fetched_at is None else self._clock() - self._fetched_at
        if age is not None and age > self._ttl_s:
            # Expired data is not used: the refresher is late, so say so instead of deciding on it.
            return CatalogView((), age, self.last_failure or "metadata_expired")
        return CatalogView(self._blueprints, age, None if self._blueprints else self.last_failure)

    def due(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at > self._ttl_s / 2

    async def refresh(self, *, run_id: str = "") -> bool:
        """One fetch. True on success; on failure records why (breaker, counter, callback)."""
        try:
            self.breaker.check()
        except BreakerOpenError:
            self._fail("breaker_open", "metadata breaker open")
            return False
        query = pb.BlueprintQuery(request_id=new_message_id(), include_graph=True, training_run_id=run_id)
        try:
            reply = await self._client.request(QUERY_CHANNEL, query, timeout_ms=self._timeout_ms)
            catalog = reply.message_as(pb.BlueprintCatalog)
            blueprints = tuple(blueprint_from_entry(e) for e in catalog.entries)
        except RequestTimeoutError:
            self.breaker.record_failure()
            self._fail("timeout_urza", f"no blueprint catalogue within {self._timeout_ms} ms")
            return False
        except (OonaError, EnvelopeError, DependencyViolationError) as e:
            self.breaker.record_failure()
            self._fail("urza_error", str(e))
            return False
        self.breaker.record_success()
        self._blueprints = blueprints
        self._fetched_at = self._clock()
        self.last_failure = None
        return True

    def _fail(self, code: str, detail: str) -> None:
        self.failures += 1
        self.last_failure = code
        log.warning("blueprint metadata unavailable", reason=code, detail=detail)
        if self._on_failure is not None:
            self._on_failure(code, detail)

    async def run(self, stop: asyncio.Event, *, poll_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        """Keep the cache fresh until `stop`; never raises. Failed refreshes back off (doubling up to
        `max_backoff_s`) so an absent library costs a request, an event and a log line per backoff
        period, not per poll."""
        wait_s = poll_s
        while not stop.is_set():
            if self.due():
                ok = await self.refresh()
                wait_s = poll_s if ok else min(max(wait_s * 2, poll_s), max_backoff_s)
            await sleep_or_stop(stop, wait_s)
