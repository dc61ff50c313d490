"""The `policy_update` drill: live policy updates against a real worker process (part of `make e2e`).

A trainer keeps asking for decisions the whole time. A valid signed update must go live (commands
then carry its `policy_version`); a tampered-signature, a stale and a registry-mismatched update
must each be refused with `policy_update_rejected` and its reason, the live version unchanged; every
request of the drill must be answered with a verified command (decisions never interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from esper.core.clock import now_ms
from esper.core.drills import DrillResult, verdict
from esper.core.redis_server import EmbeddedRedis
from esper.leyline import CHANNELS, decode_envelope, encode_envelope, pb, unpack_as
from esper.oona import OonaClient
from esper.tamiyo.checkpoint import encode_checkpoint
from esper.tamiyo.drills import (
    READY_S,
    WAIT_S,
    Trainer,
    WorkerProcess,
    _counts,
    _kinds,
    _label_values,
    _settings,
    _until_async,
    _worker,
)
from esper.tamiyo.gnn import TamiyoGNN
from esper.tamiyo.registry import RegistrySet
from esper.tamiyo.standin import urza_stand_in

GENEROUS_MS = 1_000.0  # decisions here test continuity, not the budget
PACE_S = 0.03  # one request per simulated training step
NEW_VERSION = "drill-simic-1"


def _update(payload: bytes, *, policy_id: str, version: str, issued_at_ms: int | None = None) -> pb.PolicyUpdate:
    update = pb.PolicyUpdate(version=1, policy_id=policy_id, training_run_id="drill-run",
                             tamiyo_policy_version=version, payload=payload)
    update.issued_at.FromMilliseconds(now_ms() if issued_at_ms is None else issued_at_ms)
    return update


def _checkpoint(seed: int, registries: RegistrySet, version: str) -> bytes:
    torch.manual_seed(seed)
    return encode_checkpoint(TamiyoGNN(), registries, policy_version=version)


async def _rejections(client: OonaClient) -> list[str]:
    out: list[str] = []
    for stream in CHANNELS["telemetry"].streams:
        rows: Any = await client.redis.xrange(stream)
        for _id, fields in rows:
            packet = unpack_as(decode_envelope(fields[b"payload"]), pb.TelemetryPacket)
            out.extend(e.attributes.get("reason", "") for e in packet.events
                       if e.attributes.get("event") == "policy_update_rejected")
    return out


async def _publish_tampered(client: OonaClient, update: pb.PolicyUpdate) -> None:
    """A correctly signed envelope whose payload is then altered in flight (signature kept)."""
    env, _raw = client.seal(update, max_bytes=CHANNELS["policy"].max_message_bytes)
    altered = pb.PolicyUpdate.FromString(env.payload)
    altered.policy_id = f"{altered.policy_id}-altered"
    env.payload = altered.SerializeToString()
    assert env.payload != update.SerializeToString()
    stream = CHANNELS["policy"].normal_stream
    assert stream is not None
    await client.publish_raw(stream, {b"payload": encode_envelope(env)})


async def drill_policy_update() -> DrillResult:
    server = EmbeddedRedis()
    server.start()
    try:
        secret = secrets.token_hex(16)
        settings = _settings(server.url, secret)
        async with OonaClient.from_settings(settings, sender="urza") as urza, \
                OonaClient.from_settings(settings, sender="drill-simic") as simic, \
                OonaClient.from_settings(settings, sender="drill-trainer") as trainer_client, \
                urza_stand_in(urza):
            with _worker(server.url, secret) as worker:
                return await _run(worker, simic, Trainer(trainer_client, "pu"))
    finally:
        server.stop()


def _bad_updates(simic: OonaClient) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
    """(expected rejection reason, how to send it) for each bad update."""
    registries = RegistrySet.new()
    home = RegistrySet.new().blueprint.index("BP001")  # deterministic: the worker's BP001 index too
    conflicting = RegistrySet.new()
    conflicting.blueprint.adopt({"BP-drill-other": home, "BP001": 1 + home % 1000})  # BP001 elsewhere
    return [
        ("bad_signature", lambda: _publish_tampered(simic, _update(
            _checkpoint(8, registries, "drill-signed"), policy_id="pu-tampered", version="drill-signed"))),
        ("stale_update", lambda: simic.publish("policy", _update(
            _checkpoint(9, registries, "drill-stale"), policy_id="pu-stale", version="drill-stale",
            issued_at_ms=now_ms() - 3_600_000))),
        ("registry_mismatch", lambda: simic.publish("policy", _update(
            _checkpoint(10, conflicting, "drill-registry"), policy_id="pu-registry", version="drill-registry"))),
    ]


async def _send_bad_updates(worker: WorkerProcess, simic: OonaClient, problems: list[str]) -> None:
    for n, (reason, send) in enumerate(_bad_updates(simic), start=1):
        await send()

        async def reported(n: int = n) -> bool:
            return len(await _rejections(simic)) >= n

        if not await _until_async(reported, WAIT_S, alive=worker):
            problems.append(f"no policy_update_rejected for the {reason} update")
            continue
        got = (await _rejections(simic))[n - 1]
        if got != reason:
            problems.append(f"update {n} rejected as {got!r}, expected {reason!r}")


async def _run(worker: WorkerProcess, simic: OonaClient, trainer: Trainer) -> DrillResult:
    problems: list[str] = []
    worker.start()

    async def commands_flow() -> bool:
        return (await trainer.ask(GENEROUS_MS)).kind == "command"

    if not await _until_async(commands_flow, READY_S, alive=worker, pause_s=0.2):
        return False, f"no command within {READY_S:g} s ({_counts(_kinds(trainer.outcomes))}); {worker.tail()}"
    warm = len(trainer.outcomes)
    stop = asyncio.Event()

    async def keep_asking() -> None:
        while not stop.is_set():
            await trainer.ask(GENEROUS_MS)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PACE_S):
                    await stop.wait()

    asker = asyncio.create_task(keep_asking())
    try:
        await simic.publish("policy", _update(_checkpoint(7, RegistrySet.new(), NEW_VERSION), policy_id="pu-valid",
                                              version=NEW_VERSION))

        async def live() -> bool:
            last = trainer.outcomes[-1].command if trainer.outcomes else None
            return last is not None and last.annotations.get("policy_version") == NEW_VERSION

        if not await _until_async(live, WAIT_S, alive=worker):
            problems.append(f"valid update not live after {WAIT_S:g} s")
        await _send_bad_updates(worker, simic, problems)
        await asyncio.sleep(0.3)  # decisions after the last rejection still carry the valid version
    finally:
        stop.set()
        await asyncio.wait_for(asker, WAIT_S)
    during = trainer.outcomes[warm:]
    versions_seen = [o.command.annotations.get("policy_version", "") for o in during if o.command is not None]
    after_valid = versions_seen[versions_seen.index(NEW_VERSION):] if NEW_VERSION in versions_seen else []
    metrics = await worker.metrics()
    rejected = _label_values(metrics, "tamiyo_policy_updates_rejected_total", "reason")
    applied = metrics.get(("tamiyo_policy_updates_applied_total", ()), 0.0)
    if any(o.kind != "command" for o in during):
        problems.append(f"decisions interrupted: {_counts(_kinds(during))}")
    if trainer.bad_signatures:
        problems.append(f"{trainer.bad_signatures} commands failed verify_command")
    if set(after_valid) != {NEW_VERSION}:
        problems.append(f"versions after the valid update went live: {_counts(Counter(after_valid))}")
    if applied != 1 or rejected != Counter({"bad_signature": 1, "stale_update": 1, "registry_mismatch": 1}):
        problems.append(f"metrics: applied {applied:g}, rejected {_counts(rejected)}")
    evidence = (f"{len(during)} decisions during the drill ({_counts(_kinds(during))}), policy versions seen "
                f"{_counts(Counter(versions_seen))}; applied {applied:g}; rejected {_counts(rejected)}; "
                f"events: {', '.join(await _rejections(simic))}")
    return verdict(problems, evidence)
