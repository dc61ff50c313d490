"""Simic's own training rounds: every `SIMIC_TRAIN_INTERVAL_S`, when at least
`SIMIC_TRAIN_MIN_NEW_REPORTS` reports arrived since the last round, train a candidate on the replay
store, gate it against the current policy and, when accepted (and `SIMIC_AUTO_PUBLISH`), publish it.

The current policy is the last one a round accepted, named in `SIMIC_POLICY_DIR/current.json`
(written atomically after the checkpoint itself, so a `kill -9` at any point leaves either the old or
the new state, never a name without its file); before the first accepted round it is Tamiyo's initial
policy. A round that fails (a corrupt current checkpoint, a bus error while publishing) is reported
with a `simic_round_failed` event and counted; the service keeps storing reports and tries again at
the next interval.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.files import write_bytes_atomic
from esper.core.logging import get_logger
from esper.core.telemetry import build_event, build_telemetry_packet
from esper.leyline import pb
from esper.oona import OonaClient, PublishError, RequestTimeoutError
from esper.simic.pipeline import (
    RoundResult,
    fetch_blueprints,
    initial_model,
    load_model,
    registries_and_norms,
    run_round,
    save_checkpoint,
)
from esper.simic.publish import publish_policy
from esper.simic.replay import ReplayStore
from esper.simic.settings import SimicSettings
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.registry import RegistrySet

__all__ = ["STATE_FILE", "RoundLoop", "RoundState"]

log = get_logger("esper.simic.rounds")

STATE_FILE: Final[str] = "current.json"
ROUND_RESULTS: Final[tuple[str, ...]] = ("accepted", "refused", "failed")


@dataclass(frozen=True, slots=True)
class RoundState:
    """What survives a restart: the accepted checkpoint (a file name in the policy dir, None before the
    first) and the `received_at` of the last round, from which new reports are counted."""

    checkpoint: str | None = None
    last_round_ms: int = 0

    @classmethod
    def load(cls, policy_dir: Path) -> RoundState:
        path = policy_dir / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(checkpoint=raw.get("checkpoint"), last_round_ms=int(raw.get("last_round_ms", 0)))

    def save(self, policy_dir: Path) -> None:
        policy_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"checkpoint": self.checkpoint, "last_round_ms": self.last_round_ms}, sort_keys=True)
        write_bytes_atomic(policy_dir / STATE_FILE, data.encode())


class RoundLoop:
    def __init__(self, settings: SimicSettings, client: OonaClient, store: ReplayStore,
                 registry: CollectorRegistry) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.rounds = Counter("simic_rounds", "Training rounds run", ["result"], registry=registry)
        for result in ROUND_RESULTS:  # at 0 from the start, so increase() sees the first one
            self.rounds.labels(result)
        self.last_round = Gauge("simic_last_round_timestamp_seconds", "When the last round finished",
                                registry=registry)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: wait an interval, then a round if enough new reports arrived."""
        if self.settings.train_interval_s <= 0:
            return
        while not stop.is_set():
            await sleep_or_stop(stop, self.settings.train_interval_s)
            if not stop.is_set():
                await self.maybe_train()

    async def maybe_train(self) -> RoundResult | None:
        """One round when at least `train_min_new_reports` reports arrived since the last; None when
        skipped or failed (failures are reported, never raised: the service must keep running)."""
        s = self.settings
        state = await asyncio.to_thread(RoundState.load, s.policy_dir)
        started = now_ms()
        new = await asyncio.to_thread(self.store.count, received_since_ms=state.last_round_ms)
        if new < s.train_min_new_reports:
            log.debug("no round: too few new reports", new=new, needed=s.train_min_new_reports)
            return None
        try:
            result, checkpoint, published = await self._round(state)
        except Exception as e:  # any failure of a round is reported, and the next interval tries again
            self.rounds.labels("failed").inc()
            log.error("training round failed", error=str(e), error_type=type(e).__name__)
            await self._event("simic_round_failed", pb.TELEMETRY_LEVEL_WARNING, f"{type(e).__name__}: {e}"[:200],
                              new_reports=new)
            return None
        accepted = result.gate.accepted
        await asyncio.to_thread(RoundState(checkpoint, started).save, s.policy_dir)
        self.rounds.labels("accepted" if accepted else "refused").inc()
        self.last_round.set(now_ms() / 1000.0)
        log.info("training round", accepted=accepted, reason=result.gate.reason, published=published,
                 policy_version=result.policy_version, samples=result.samples)
        await self._event("simic_round", pb.TELEMETRY_LEVEL_INFO, result.gate.reason[:200], accepted=accepted,
                          published=published, policy_version=result.policy_version, samples=result.samples,
                          holdout=result.holdout, new_reports=new, decisive=result.gate.decisive)
        return result

    async def _round(self, state: RoundState) -> tuple[RoundResult, str | None, bool]:
        """(result, the current checkpoint's name after it, published). An accepted candidate's file is
        written before it is published, and the state names it only after both."""
        s = self.settings
        registries, norms = registries_and_norms(s)
        current = await asyncio.to_thread(self._current, state, registries)
        try:
            blueprints = await fetch_blueprints(self.client, timeout_ms=s.catalog_timeout_ms)
        except RequestTimeoutError:
            log.warning("no blueprint catalogue from Urza: training without blueprint nodes")
            blueprints = ()
        reports = await asyncio.to_thread(self.store.reports, limit=s.train_max_reports)
        result = await asyncio.to_thread(run_round, reports, current, s, blueprints=blueprints,
                                         registries=registries, normaliser=norms)
        if not result.gate.accepted:
            return result, state.checkpoint, False
        name = (await asyncio.to_thread(save_checkpoint, result.checkpoint, s.policy_dir)).name
        if s.auto_publish:
            await publish_policy(self.client, result.checkpoint, training_run_id="simic-round")
        return result, name, s.auto_publish

    def _current(self, state: RoundState, registries: RegistrySet) -> TamiyoGNN:
        if state.checkpoint is None:
            return initial_model()
        return load_model(self.settings.policy_dir / state.checkpoint, registries)[0]

    async def _event(self, name: str, level: int, description: str, **attrs: Any) -> None:
        event = build_event(name, level=level, description=description, **attrs)
        try:
            await self.client.publish("telemetry", build_telemetry_packet("simic", events=[event]))
        except PublishError as e:
            log.warning("simic telemetry not sent", error=str(e))
