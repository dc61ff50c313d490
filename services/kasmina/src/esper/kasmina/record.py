"""Per-seed executor state: the slot, its lifecycle, and what Kasmina has observed about its seed."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from esper.kasmina.blending import AlphaSchedule, BlendSpec
from esper.kasmina.errors import KernelFetchError
from esper.kasmina.isolation import IsolationStats
from esper.kasmina.kernels import FetchedKernel
from esper.kasmina.lifecycle import SeedLifecycle
from esper.kasmina.slot import SeedSlot

__all__ = ["FetchState", "SeedRecord"]

FetchState = Literal["none", "pending", "in_flight", "ready", "failed"]

_WINDOW = 4096  # cap on any per-stage list (a window is at most a few hundred steps)


@dataclass(slots=True)
class SeedRecord:
    slot: SeedSlot
    lifecycle: SeedLifecycle
    depth: int
    # what was germinated
    command_id: str = ""
    blueprint_id: str = ""
    kernel_id: str = ""
    spec: BlendSpec | None = None
    schedule: AlphaSchedule | None = None
    mesh_layers: tuple[str, ...] = ()
    performance_status: str = "nominal"
    generation: int = 0  # bumped by every germination and cull: a late kernel for an old one is dropped
    # kernel
    fetch_state: FetchState = "none"
    fetched: FetchedKernel | None = None
    fetch_error: KernelFetchError | None = None
    fetch_generation: int = -1  # the germination the ready/failed fetch was for (a late write is stale)
    kernel_latency_ms: float = 0.0
    risk: float = 0.0
    allowed_blend: tuple[str, ...] = ()
    # progression
    stage_steps: int = 0
    blend_step: int = 0
    paused_steps: int = 0
    germinated_epoch: int = 0
    # observations
    grad_norm: float = 0.0
    isolation: IsolationStats = field(default_factory=IsolationStats)
    isolation_violations: int = 0
    local_losses: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    baseline_losses: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    shadow_losses: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    # (loss with the seed, loss with it ablated) of the same SHADOWING step: `report_shadow` holds its
    # value in `shadow_pending` until that step is counted (a paused, refused or lossless step drops it)
    shadow_pairs: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=_WINDOW))
    shadow_pending: float | None = None
    evidence: list[float] = field(default_factory=list)  # loss_without - loss_with per validation report

    @property
    def seed_id(self) -> str:
        return self.slot.seed_id

    @property
    def stage(self) -> int:
        return self.lifecycle.stage

    @property
    def kernel_attached(self) -> bool:
        return self.slot.seed is not None

    def clear_seed(self, *, new_seed: bool = False) -> None:
        """Forget everything about the current seed (after a cull, before a germination). Its isolation
        violations stay readable after a cull (they are why it went) until ``new_seed``: a new seed in
        the slot starts from 0."""
        self.command_id = self.blueprint_id = self.kernel_id = ""
        self.spec = None
        self.schedule = None
        self.mesh_layers = ()
        self.performance_status = "nominal"
        self.generation += 1
        self.fetch_state = "none"
        self.fetched = None
        self.fetch_error = None
        self.allowed_blend = ()
        self.risk = 0.0
        self.stage_steps = self.blend_step = self.paused_steps = 0
        self.grad_norm = 0.0
        self.isolation = IsolationStats()
        for window in (self.local_losses, self.latencies_ms, self.baseline_losses, self.shadow_losses):
            window.clear()
        self.shadow_pairs.clear()
        self.shadow_pending = None
        self.evidence.clear()
        if new_seed:
            self.isolation_violations = 0
