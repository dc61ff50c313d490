"""Simic's own training rounds: every `SIMIC_TRAIN_INTERVAL_S`, when at least
`SIMIC_TRAIN_MIN_NEW_REPORTS` reports arrived since the last round, train a candidate on the newest
`SIMIC_TRAIN_MAX_REPORTS` reports of the replay store, gate it against the current policy and, when
accepted (and `SIMIC_AUTO_PUBLISH`), publish it.

The current policy is the last one a round accepted, named in `SIMIC_POLICY_DIR/current.json`;
before the first accepted round it is Tamiyo's initial policy. The order makes a `kill -9` at any
point safe: the candidate's checkpoint file, then the state naming it with `pending_publish`, then the
publish, then the state without the flag; a state found pending is published again before anything
else (the update's `policy_id` is the checkpoint's hash, so a repeat is the same update). A round
without Urza's catalogue is refused rather than trained on graphs with no blueprint nodes (the pair
scores that decide germinations would be untrained and the gate blind to them). A round that fails
is a `simic_round_failed` event and `simic_rounds_total{result="failed"}`: the loop outlives
anything a round raises, the service keeps storing reports, and the next interval tries again.
A shutdown (the loop's stop event) cancels a round in progress at its next optimizer step
(`simic_rounds_total{result="cancelled"}`, no state written): the round runs in a worker thread,
which the event loop could not otherwise interrupt, so SIGTERM would wait minutes for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.core.clock import now_ms, sleep_or_stop
from esper.core.errors import DependencyViolationError
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
from esper.simic.publish import build_update
from esper.simic.replay import ReplayStore
from esper.simic.settings import SimicSettings
from esper.simic.training import TrainingCancelled
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.registry import RegistrySet

__all__ = ["STATE_FILE", "RoundLoop", "RoundState"]

log = get_logger("esper.simic.rounds")

STATE_FILE: Final[str] = "current.json"
ROUND_RESULTS: Final[tuple[str, ...]] = ("accepted", "refused", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class RoundState:
    """What survives a restart: the accepted checkpoint (a file name in the policy dir, None before the
    first), the `received_at` of the last round, from which new reports are counted, and whether that
    checkpoint still has to be published."""

    checkpoint: str | None = None
    last_round_ms: int = 0
    pending_publish: bool = False

    @classmethod
    def load(cls, policy_dir: Path) -> RoundState:
        path = policy_dir / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(checkpoint=raw.get("checkpoint"), last_round_ms=int(raw.get("last_round_ms", 0)),
                   pending_publish=bool(raw.get("pending_publish", False)))

    def save(self, policy_dir: Path) -> None:
        policy_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"checkpoint": self.checkpoint, "last_round_ms": self.last_round_ms,
                           "pending_publish": self.pending_publish}, sort_keys=True)
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
        self.cancel = threading.Event()  # set on shutdown: the worker thread's round stops at its next step
        self.training = False  # a round's worker thread is running

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: wait an interval, then a round if enough new reports arrived. `stop` also
        cancels a round in progress."""
        if self.settings.train_interval_s <= 0:
            return
        watcher = asyncio.create_task(self._cancel_on(stop))
        try:
            while not stop.is_set():
                await sleep_or_stop(stop, self.settings.train_interval_s)
                if not stop.is_set():
                    await self.maybe_train()
        finally:
            watcher.cancel()

    async def _cancel_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.cancel.set()

    async def maybe_train(self) -> RoundResult | None:
        """A pending publish first, then one round when at least `train_min_new_reports` reports arrived
        since the last. None when no round ran or it failed: failures are reported, never raised."""
        try:
            return await self._maybe_train()
        except TrainingCancelled:
            self.rounds.labels("cancelled").inc()
            log.warning("training round cancelled by shutdown: nothing written, the next start tries again")
            return None
        except Exception as e:  # any failure of a round is reported, and the next interval tries again
            self.rounds.labels("failed").inc()
            log.error("training round failed", error=str(e), error_type=type(e).__name__)
            with contextlib.suppress(Exception):  # the report must not be what kills the loop
                await self._event("simic_round_failed", pb.TELEMETRY_LEVEL_WARNING,
                                  f"{type(e).__name__}: {e}"[:200])
            return None

    async def _maybe_train(self) -> RoundResult | None:
        s = self.settings
        state = await asyncio.to_thread(RoundState.load, s.policy_dir)
        if state.pending_publish and state.checkpoint is not None:
            await self._publish(state.checkpoint)
            state = replace(state, pending_publish=False)
            await asyncio.to_thread(state.save, s.policy_dir)
        started = now_ms()
        new = await asyncio.to_thread(self.store.count, received_since_ms=state.last_round_ms)
        if new < s.train_min_new_reports:
            log.debug("no round: too few new reports", new=new, needed=s.train_min_new_reports)
            return None
        result = await self._train(state)
        accepted = result.gate.accepted
        if not accepted:
            await asyncio.to_thread(replace(state, last_round_ms=started).save, s.policy_dir)
        else:
            name = (await asyncio.to_thread(save_checkpoint, result.checkpoint, s.policy_dir)).name
            chosen = RoundState(name, started, pending_publish=s.auto_publish)
            await asyncio.to_thread(chosen.save, s.policy_dir)
            if s.auto_publish:
                await self._publish(name)
                await asyncio.to_thread(replace(chosen, pending_publish=False).save, s.policy_dir)
        self.rounds.labels("accepted" if accepted else "refused").inc()
        self.last_round.set(now_ms() / 1000.0)
        published = accepted and s.auto_publish
        log.info("training round", accepted=accepted, reason=result.gate.reason, published=published,
                 policy_version=result.policy_version, samples=result.samples)
        await self._event("simic_round", pb.TELEMETRY_LEVEL_INFO, result.gate.reason[:200], accepted=accepted,
                          published=published, policy_version=result.policy_version, samples=result.samples,
                          holdout=result.holdout, new_reports=new, decisive=result.gate.decisive)
        return result

    async def _train(self, state: RoundState) -> RoundResult:
        s = self.settings
        registries, norms = await asyncio.to_thread(registries_and_norms, s)
        current = await asyncio.to_thread(self._current, state, registries)
        try:
            blueprints = await fetch_blueprints(self.client, timeout_ms=s.catalog_timeout_ms)
        except RequestTimeoutError as e:
            raise DependencyViolationError(f"no blueprint catalogue from Urza within {s.catalog_timeout_ms:g} ms: "
                                           "a round without blueprint nodes would leave the pair scores "
                                           "untrained") from e
        if not blueprints:
            raise DependencyViolationError("Urza's blueprint catalogue is empty")
        reports = await asyncio.to_thread(self.store.latest, limit=s.train_max_reports)
        # The round runs in a worker thread, which only `self.cancel` can end early (module doc).
        self.training = True
        try:
            return await asyncio.to_thread(run_round, reports, current, s, blueprints=blueprints,
                                           registries=registries, normaliser=norms, cancel=self.cancel)
        finally:
            self.training = False

    async def _publish(self, name: str) -> None:
        update = await asyncio.to_thread(build_update, self.settings.policy_dir / name, training_run_id="simic-round")
        await self.client.publish("policy", update)

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
