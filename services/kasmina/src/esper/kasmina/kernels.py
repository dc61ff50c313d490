"""Kernels from Urza over Oona: request, verify, cache, rebuild. The only IO in Kasmina.

``KernelClient.fetch(blueprint_id, slot)``:

1. ``KernelPrefetchRequest`` on ``kernel.request`` (request id ``prefetch-<uuid>``, payload
   ``issued_at`` now) and wait for the reply until the deadline (``timeout_ms``);
2. ``KernelArtifactReady`` → the artifact, from the LRU cache if its checksum is there, else read
   from the shared artifact directory with ``ArtifactStore.load`` (sha256 first, then the guard
   digest Urza promised, ``weights_only`` loading) — file reads in a worker thread;
3. the module rebuilt from Karn's trusted template code (``rebuild``) on the requested device.

The read and the rebuild each get ``timeout_ms`` too: a hung read (a stalled network mount) fails the
fetch as ``timeout`` instead of leaving the germination waiting for ever (the worker thread itself
cannot be stopped and finishes, or not, on its own). Any failure is a :class:`KernelFetchError` with
Urza's or our reason code (``timeout``, ``breaker_open``, ``bus_unavailable``, ``artifact_not_found``,
``missing_artifact``, ``checksum_mismatch``, ``artifact_format``, ``artifact_io`` (an OS error reading
the file), ``rebuild_failed``, ``slot_mismatch``, ``missing_id``, ``unexpected_reply``);
there is no fallback kernel. A circuit breaker (prototype: 3 failures, 2 successes, 60 s) counts
the failures that say the *dependency* is unhealthy (timeouts, bus errors, bad or missing files),
not a request for a blueprint that simply has no kernel.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import torch
from torch import nn

from esper.core.breaker import CircuitBreaker, TransitionCallback
from esper.core.clock import now_ms
from esper.karn.template import SlotShape
from esper.kasmina.errors import KernelFetchError
from esper.leyline import LeylineError, pb
from esper.oona import OonaClient, OonaError, RequestTimeoutError
from esper.urza.artifact import Artifact, TemplateLookup, kernel_id, rebuild
from esper.urza.errors import UrzaError
from esper.urza.store import ArtifactStore

T = TypeVar("T")

__all__ = ["BREAKER_REASONS", "FetchedKernel", "KernelClient", "KernelSource", "KernelStats", "resolve_kernel_id"]

KERNEL_CHANNEL: Final[str] = "kernel.request"
BREAKER_REASONS: Final[frozenset[str]] = frozenset(
    {"timeout", "bus_unavailable", "missing_artifact", "checksum_mismatch", "artifact_format", "artifact_io",
     "unexpected_reply"})
"""Failures that count against the kernel-fetch breaker."""


@dataclass(frozen=True, slots=True)
class FetchedKernel:
    """A verified kernel, rebuilt and ready to attach."""

    module: nn.Module
    blueprint_id: str  # the template id (``BP002``)
    kernel_id: str  # ``BP002@v64``
    checksum: str
    guard_digest: str
    params: Mapping[str, float]
    latency_ms: float
    cache_hit: bool


class KernelSource(Protocol):
    """Where Kasmina gets kernels from (``KernelClient`` in production)."""

    async def fetch(self, blueprint_id: str, slot: SlotShape, *, device: torch.device) -> FetchedKernel: ...


@dataclass(slots=True)
class KernelStats:
    requests: int = 0
    ready: int = 0
    errors: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    loads: int = 0  # artifact reads from the store (a cache hit reads nothing)
    last_latency_ms: float = 0.0


def resolve_kernel_id(blueprint_id: str, slot: SlotShape) -> str:
    """``BP002`` → ``BP002@v64`` for a 64-channel vector slot; an explicit kernel id must name this slot."""
    if not blueprint_id.strip():
        raise KernelFetchError("missing_id", "empty blueprint id")
    if "@" not in blueprint_id:
        return kernel_id(blueprint_id, slot)
    if blueprint_id.rsplit("@", 1)[1] != slot.as_key():
        raise KernelFetchError("slot_mismatch", f"kernel {blueprint_id} is not for slot {slot.as_key()}",
                               kernel_id=blueprint_id)
    return blueprint_id


class KernelClient:
    """Kernel fetches over Oona with an LRU cache of verified artifacts (keyed by checksum)."""

    def __init__(self, bus: OonaClient, store: ArtifactStore, *, timeout_ms: float = 2000.0, cache_size: int = 32,
                 training_run_id: str = "", breaker: CircuitBreaker | None = None,
                 on_breaker_transition: TransitionCallback | None = None,
                 templates: TemplateLookup | None = None) -> None:
        if timeout_ms <= 0 or cache_size < 1:
            raise ValueError("timeout_ms must be > 0 and cache_size >= 1")
        self.bus = bus
        self.store = store
        self.timeout_ms = timeout_ms
        self.cache_size = cache_size
        self.training_run_id = training_run_id
        self.breaker = breaker or CircuitBreaker("kernel_fetch", failure_threshold=3, success_threshold=2,
                                                 reset_timeout_s=60.0, on_transition=on_breaker_transition)
        self.templates = templates
        self.stats = KernelStats()
        self._cache: OrderedDict[str, Artifact] = OrderedDict()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> int:
        """Forget every cached artifact (emergency memory cleanup); returns how many there were."""
        n = len(self._cache)
        self._cache.clear()
        return n

    async def fetch(self, blueprint_id: str, slot: SlotShape, *, device: torch.device | str = "cpu") -> FetchedKernel:
        """The kernel for ``blueprint_id`` at ``slot``, rebuilt on ``device``; KernelFetchError otherwise."""
        t0 = time.perf_counter()
        kid = resolve_kernel_id(blueprint_id, slot)
        try:
            self._admit(kid)
            ready = await self.request_ready(kid)
            artifact, hit = await self._artifact(ready, slot)
            try:
                module = await self._in_thread(kid, "rebuild", rebuild, artifact, torch.device(device),
                                               templates=self.templates)
            except UrzaError as e:
                raise KernelFetchError(e.reason, str(e)[:300], kernel_id=kid) from e
            except (ValueError, TypeError, RuntimeError) as e:  # a device move, a template refusing params
                raise KernelFetchError("rebuild_failed", f"{type(e).__name__}: {e}"[:300], kernel_id=kid) from e
        except KernelFetchError as e:
            self.stats.errors += 1
            if e.reason in BREAKER_REASONS:
                self.breaker.record_failure()
            raise
        self.breaker.record_success()
        latency = (time.perf_counter() - t0) * 1000.0
        self.stats.last_latency_ms = latency
        return FetchedKernel(module=module, blueprint_id=artifact.blueprint_id, kernel_id=artifact.kernel_id,
                             checksum=artifact.checksum, guard_digest=artifact.guard_digest,
                             params=dict(artifact.params), latency_ms=latency, cache_hit=hit)

    async def prefetch(self, blueprint_id: str, slot: SlotShape) -> Artifact:
        """Warm the cache with the kernel's verified artifact (no module built)."""
        kid = resolve_kernel_id(blueprint_id, slot)
        self._admit(kid)
        try:
            artifact, _ = await self._artifact(await self.request_ready(kid), slot)
        except KernelFetchError as e:
            if e.reason in BREAKER_REASONS:
                self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return artifact

    async def _in_thread(self, kid: str, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, bounded by ``timeout_ms`` (KernelFetchError ``timeout`` past it)."""
        try:
            async with asyncio.timeout(self.timeout_ms / 1000.0):
                return await asyncio.to_thread(fn, *args, **kwargs)
        except TimeoutError as e:
            raise KernelFetchError("timeout", f"artifact {what} took over {self.timeout_ms:g} ms", kernel_id=kid) from e

    def _admit(self, kid: str) -> None:
        if not self.breaker.allow():
            raise KernelFetchError("breaker_open", f"retry in {self.breaker.retry_after_s():.1f} s", kernel_id=kid)

    async def request_ready(self, kid: str) -> pb.KernelArtifactReady:
        """Ask Urza for ``kid`` and return its ``KernelArtifactReady`` (Urza's error reason otherwise)."""
        request = pb.KernelPrefetchRequest(request_id=f"prefetch-{uuid.uuid4().hex}", blueprint_id=kid,
                                           training_run_id=self.training_run_id)
        request.issued_at.FromMilliseconds(now_ms())
        self.stats.requests += 1
        try:
            reply = await self.bus.request(KERNEL_CHANNEL, request, timeout_ms=self.timeout_ms)
        except RequestTimeoutError as e:
            raise KernelFetchError("timeout", f"no answer within {self.timeout_ms:g} ms", kernel_id=kid) from e
        except OonaError as e:
            raise KernelFetchError("bus_unavailable", str(e)[:300], kernel_id=kid) from e
        try:
            if reply.message_type == pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY:
                ready = reply.message_as(pb.KernelArtifactReady)
            elif reply.message_type == pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR:
                error = reply.message_as(pb.KernelArtifactError)
                raise KernelFetchError(error.reason or "kernel_error", f"Urza refused {kid}", kernel_id=kid)
            else:
                raise KernelFetchError("unexpected_reply", f"message type {reply.message_type}", kernel_id=kid)
        except LeylineError as e:
            raise KernelFetchError("unexpected_reply", str(e)[:300], kernel_id=kid) from e
        if ready.request_id != request.request_id or not ready.checksum or not ready.artifact_ref:
            raise KernelFetchError("unexpected_reply", "ready reply does not match the request", kernel_id=kid)
        self.stats.ready += 1
        return ready

    async def _artifact(self, ready: pb.KernelArtifactReady, slot: SlotShape) -> tuple[Artifact, bool]:
        """The verified artifact ``ready`` names: from the cache, or read and verified in a thread."""
        kid = ready.blueprint_id
        cached = self._cache.get(ready.checksum)
        if cached is not None and cached.guard_digest == ready.guard_digest:
            self._cache.move_to_end(ready.checksum)
            self.stats.cache_hits += 1
            artifact, hit = cached, True
        else:
            self.stats.cache_misses += 1
            self.stats.loads += 1
            try:
                artifact = await self._in_thread(kid, "read", self.store.load, ready.artifact_ref, ready.checksum,
                                                 expected_guard_digest=ready.guard_digest)
            except UrzaError as e:
                raise KernelFetchError(e.reason, str(e)[:300], kernel_id=kid) from e
            except OSError as e:  # EIO, ELOOP, EACCES...: the store is unhealthy (counts for the breaker)
                raise KernelFetchError("artifact_io", f"{type(e).__name__}: {e}"[:300], kernel_id=kid) from e
            self._cache[ready.checksum] = artifact
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            hit = False
        if artifact.slot != slot.as_key():
            raise KernelFetchError("slot_mismatch", f"artifact is for {artifact.slot}, slot is {slot.as_key()}",
                                   kernel_id=kid)
        return artifact, hit

    def load_ready(self, ready: pb.KernelArtifactReady) -> Artifact:
        """Synchronous verification of one ``KernelArtifactReady`` against the store (no cache)."""
        try:
            return self.store.load(ready.artifact_ref, ready.checksum, expected_guard_digest=ready.guard_digest)
        except UrzaError as e:
            raise KernelFetchError(e.reason, str(e)[:300], kernel_id=ready.blueprint_id) from e
