"""Tolaria drills: `python -m esper.tolaria drill [NAME|all]` (part of `make e2e`).

Same rules as the other drills (docs/drills.md): a private `redis-server` on a free port, a fresh
secret, real processes (`python -m esper.tolaria`, `python -m esper.tamiyo`, `python -m esper.urza`),
pass criteria that are invariants (counts, events on the bus, exit codes), never wall-clock
thresholds; timeouts are liveness bounds only.

`emergency`: the trainer runs with no Tamiyo at all and a NaN injected into one step's loss. Pass:
the run finishes every epoch (the trainer never stalls: every decision is a counted timeout, with
HIGH `tamiyo_timeout` telemetry on the emergency lane), the decision breaker opens after exactly
`TOLARIA_DECISION_BREAKER_FAILURES` timeouts (conservative mode: one HIGH `conservative_mode_entered`
on the emergency lane, later steps skip their decision instead of timing out, so the timeouts are
bounded by the failures and the probes), the bad step is refused and rolled back from the fast tier,
and an `EmergencySignal` (ELEVATED, origin tolaria, reason non_finite) is on the emergency lane.

`fallback_rejection`: Urza serves the catalogue but holds no kernel. Pass: Tamiyo's germinations each
fail explicitly (`germination_failed`, reason `artifact_not_found`), the seeds are culled, nothing is
grafted (no substitute kernel), and the run finishes.

`tamiyo_crash`: trainer, Urza and Tamiyo run; once commands flow the Tamiyo worker is SIGKILLed.
Pass: the trainer keeps training (timeouts counted, exit 0, every epoch done) in conservative mode
(entered, decisions skipped rather than waited for), a restarted worker answers again (decisions
resume through a half-open probe: its own decision counter rises while the same run goes on, and
`conservative_mode_cleared` is on the bus). The drill's breaker reset is short
(`TOLARIA_DECISION_BREAKER_RESET_S=0.5`) and its steps last 30 ms (`TOLARIA_FAULT_STEP_DELAY_MS`, as a
small real model's; the toy model's 2 ms steps would finish the run before a new worker is up), so
that the probes come while the run goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from esper.core import drills as core_drills
from esper.core.drills import Drill, DrillResult, verdict
from esper.core.probe import scrape_total
from esper.core.redis_server import EmbeddedRedis, free_port
from esper.leyline import CHANNELS, decode_envelope, pb, unpack_as

DRILL_TIMEOUT_S = 180.0  # liveness only
WAIT_S = 60.0


class Fleet:
    """Processes of one drill sharing a private redis-server, a secret and a temp dir."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("ESPER_", "TAMIYO_", "TOLARIA_", "URZA_", "TEZZERET_", "KASMINA_"))}
        self.env = {**base, "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secrets.token_hex(16),
                    "ESPER_LOG_LEVEL": "WARNING", "ESPER_LOG_FORMAT": "json", "ESPER_METRICS_PORT": "-1",
                    "URZA_DATABASE_URL": f"sqlite:///{tmp}/urza/catalog.db", "URZA_ARTIFACT_DIR": str(tmp / "urza/a"),
                    "URZA_SEED_SLOT": "v16", "TAMIYO_VAR_DIR": str(tmp / "tamiyo"),
                    "TAMIYO_POLICY_DIR": str(tmp / "tamiyo/policies"), "TOLARIA_VAR_DIR": str(tmp / "tolaria"),
                    "TOLARIA_HIDDEN_WIDTH": "16", "TOLARIA_SUMMARY_JSON": str(tmp / "summary.json")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, module: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{name}.log").open("ab")
        self._logs.append(out)
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env={**self.env, **env}, cwd=self.tmp,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def summary(self) -> dict[str, Any]:
        path = self.tmp / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def tail(self, name: str, limit: int = 600) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-limit:] if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()


@contextlib.contextmanager
def _fleet() -> Iterator[tuple[Fleet, EmbeddedRedis]]:
    server = EmbeddedRedis()
    server.start()
    with tempfile.TemporaryDirectory(prefix="esper-tolaria-drill-") as tmp:
        fleet = Fleet(Path(tmp), server.url)
        try:
            yield fleet, server
        finally:
            fleet.stop_all()
            server.stop()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return await asyncio.to_thread(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _stream_entries(url: str, stream: str) -> list[tuple[tuple[int, int], Any]]:
    """(entry id as (ms, seq), envelope) of every entry, oldest first."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        rows: Any = client.xrange(stream)
    finally:
        client.close()
    return [(_entry_key(entry_id), decode_envelope(fields[b"payload"])) for entry_id, fields in rows or []]


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.decode().partition("-")
    return int(ms), int(seq or 0)


def _stream_messages(url: str, stream: str) -> list[Any]:
    return [env for _key, env in _stream_entries(url, stream)]


def _events(url: str, lane: str, *, source: str | None = None) -> list[dict[str, str]]:
    """Event attributes on one telemetry lane ("both": the two lanes merged in the order Redis stored
    them); `source`: only packets from that subsystem (Tamiyo names some events as Tolaria does,
    `conservative_mode_entered` for one)."""
    lanes: tuple[Literal["normal", "emergency"], ...] = (
        ("normal", "emergency") if lane == "both" else ("emergency" if lane == "emergency" else "normal",))
    entries = sorted((entry for name in lanes for entry in _stream_entries(url, CHANNELS["telemetry"].stream(name))),
                     key=lambda entry: entry[0])
    packets = [unpack_as(env, pb.TelemetryPacket) for _key, env in entries]
    return [dict(e.attributes) for p in packets if source is None or p.source_subsystem == source for e in p.events]


async def drill_emergency() -> DrillResult:
    with _fleet() as (fleet, server):
        failures = 3
        # Step 10's loss is NaN (refused, restored). Step 15's update writes NaN into the weights, and
        # with a snapshot every step (overhead budget 0) step 15's snapshot holds them: step 16 fails and
        # restores them, step 17 fails on them again and the rollback goes back past them, to step 14.
        # A rollback that restored nothing would leave every later step failing.
        proc = fleet.start("tolaria", "esper.tolaria", "run", ESPER_ENABLE_FAULT_INJECTION="1",
                           TOLARIA_FAULT_NAN_AT_STEP="10", TOLARIA_FAULT_CORRUPT_WEIGHTS_AT_STEP="15",
                           TOLARIA_ROLLBACK_SNAPSHOT_OVERHEAD="0",
                           TOLARIA_EPOCHS="2", TAMIYO_STEP_TIMEOUT_MS="5",
                           TOLARIA_DECISION_BREAKER_FAILURES=str(failures),
                           # ~2 ms steps would end the run before `failures` timeouts (each takes 5 ms
                           # plus the bus thread's wake-up) were even seen: give the steps real length.
                           TOLARIA_FAULT_STEP_DELAY_MS="10")
        rc = await _wait_exit(proc, WAIT_S * 2)
        s = fleet.summary()
        signals = [unpack_as(env, pb.EmergencySignal)
                   for env in _stream_messages(server.url, CHANNELS["emergency"].emergency_stream)]
        emergency_events = _events(server.url, "emergency", source="tolaria")
        high = [e for e in emergency_events if e.get("event") == "tamiyo_timeout"]
        entered = [e for e in emergency_events if e.get("event") == "conservative_mode_entered"]
        problems = []
        if rc != 0:
            problems.append(f"tolaria exit {rc}: {fleet.tail('tolaria')}")
        if s.get("epochs") != 2:
            problems.append(f"epochs {s.get('epochs')} of 2")
        if s.get("step_failures") != {"non_finite": 3} or s.get("rollbacks") != {"fast": 3}:
            problems.append(f"step failures {s.get('step_failures')}, rollbacks {s.get('rollbacks')}")
        # in the order they happened: a rollback's event rides the emergency lane once the client is in
        # conservative mode, so one lane after the other was ordered by when the breaker opened
        restored = [e.get("restored_step") for e in _events(server.url, "both", source="tolaria")
                    if e.get("event") == "rollback"]
        if restored != ["9", "15", "14"]:
            problems.append(f"rollbacks restored steps {restored}, not 9, 15 (the broken snapshot), then 14")
        if not (isinstance(s.get("final_val_loss"), float) and math.isfinite(s["final_val_loss"])
                and s.get("final_val_accuracy", 0.0) > 0.2):  # chance is 0.1; NaN weights give a NaN loss
            problems.append(f"training did not go on from good weights: validation loss {s.get('final_val_loss')}, "
                            f"accuracy {s.get('final_val_accuracy')}")
        if not (s.get("timeouts", 0) > 0 and s.get("decision_commands") == 0):
            problems.append(f"decisions without a Tamiyo: {s.get('timeouts')} timeouts, "
                            f"{s.get('decision_commands')} commands")
        if not any(x.level == pb.EMERGENCY_LEVEL_ELEVATED and x.origin == "tolaria" and x.reason == "non_finite"
                   for x in signals):
            problems.append(f"no ELEVATED non_finite EmergencySignal on the emergency lane ({len(signals)} signals)")
        if not high:
            problems.append("no HIGH tamiyo_timeout telemetry on the emergency lane")
        # no Tamiyo: every request times out, so the breaker opens once, after exactly `failures`
        # timeouts; then only half-open probes ask (plus, at most, the last request, settled after the run)
        timeouts, probes = s.get("timeouts", 0), s.get("conservative_probes", 0)
        if s.get("conservative_entries") != 1 or len(entered) != 1:
            problems.append(f"conservative mode entered {s.get('conservative_entries')} times, "
                            f"{len(entered)} HIGH conservative_mode_entered events on the emergency lane")
        if not failures <= timeouts <= failures + probes + 1 or len(high) != timeouts:
            problems.append(f"timeouts {timeouts} not bounded by {failures} failures + {probes} probes, or "
                            f"{len(high)} tamiyo_timeout events for them")
        if not s.get("decisions_skipped_conservative", 0) > 0:
            problems.append("no decision skipped in conservative mode")
        evidence = (f"rc {rc}; {s.get('epochs')} epochs, {s.get('steps')} steps, val accuracy "
                    f"{s.get('final_val_accuracy')}; step failures {s.get('step_failures')}, rollbacks "
                    f"{s.get('rollbacks')} restoring steps {restored}; decisions: timeouts {s.get('timeouts')}, "
                    f"commands {s.get('decision_commands')}; conservative mode: entries "
                    f"{s.get('conservative_entries')}, steps {s.get('conservative_steps')}, skipped "
                    f"{s.get('decisions_skipped_conservative')}, probes {probes}; EmergencySignals on the lane: "
                    f"{[(pb.EmergencyLevel.Name(x.level), x.reason) for x in signals]}; HIGH tamiyo_timeout events "
                    f"{len(high)}, HIGH conservative_mode_entered events {len(entered)}")
        return verdict(problems, evidence)


async def drill_tamiyo_crash() -> DrillResult:
    with _fleet() as (fleet, server):
        fleet.start("urza", "esper.urza", "run")
        ports = [free_port(), free_port()]
        tamiyo = fleet.start("tamiyo-1", "esper.tamiyo", "run", ESPER_METRICS_PORT=str(ports[0]),
                             TAMIYO_METADATA_TIMEOUT_MS="500")
        # In conservative mode the steps run at full speed, and the toy model's take ~2 ms: the rest of
        # the run would be over before a new worker is up. The steps are therefore made as long as a
        # small real model's (30 ms, a sleep: no CPU), and the breaker's reset is short so that the
        # probes come while the run goes on.
        trainer = fleet.start("tolaria", "esper.tolaria", "run", TOLARIA_EPOCHS="40", TOLARIA_DECISION_MODE="sync",
                              TAMIYO_STEP_TIMEOUT_MS="100", TOLARIA_EMERGENCY_ENABLED="false",
                              TOLARIA_DECISION_BREAKER_FAILURES="3", TOLARIA_DECISION_BREAKER_RESET_S="0.5",
                              ESPER_ENABLE_FAULT_INJECTION="1", TOLARIA_FAULT_STEP_DELAY_MS="30")
        problems: list[str] = []
        deadline = time.monotonic() + WAIT_S
        first = 0.0
        while time.monotonic() < deadline and trainer.poll() is None:
            first = await scrape_total(ports[0], "tamiyo_decisions_total")
            if first >= 20:
                break
            await asyncio.sleep(0.2)
        if not first >= 20:
            problems.append(f"the first worker made {first} decisions")
        tamiyo.kill()
        tamiyo.wait()
        await asyncio.sleep(1.0)  # the trainer trains on, every decision a timeout
        fleet.start("tamiyo-2", "esper.tamiyo", "run", ESPER_METRICS_PORT=str(ports[1]),
                    TAMIYO_METADATA_TIMEOUT_MS="500")
        resumed = 0.0
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and trainer.poll() is None:
            resumed = await scrape_total(ports[1], "tamiyo_decisions_total")
            if resumed >= 5:
                break
            await asyncio.sleep(0.2)
        if not resumed >= 5:
            problems.append(f"after the restart the trainer got {resumed} decisions before it finished")
        rc = await _wait_exit(trainer, WAIT_S * 2)
        s = fleet.summary()
        if rc != 0 or s.get("epochs") != 40:
            problems.append(f"trainer rc {rc}, epochs {s.get('epochs')} of 40: {fleet.tail('tolaria')}")
        if not s.get("timeouts", 0) > 0:
            problems.append("no timeout counted while no worker ran")
        events = _events(server.url, "both", source="tolaria")
        entered = sum(e.get("event") == "conservative_mode_entered" for e in events)
        cleared = sum(e.get("event") == "conservative_mode_cleared" for e in events)
        if not (s.get("conservative_entries", 0) >= 1 and entered == s.get("conservative_entries")):
            problems.append(f"conservative mode entered {s.get('conservative_entries')} times, {entered} events")
        if not s.get("decisions_skipped_conservative", 0) > 0:
            problems.append("no decision skipped in conservative mode (every step waited for a dead worker)")
        if not (cleared >= 1 and s.get("conservative_probes", 0) >= 1):
            problems.append(f"decisions did not resume through a probe: {cleared} conservative_mode_cleared events, "
                            f"{s.get('conservative_probes')} probes")
        evidence = (f"worker 1: {first:g} decisions, then SIGKILL; trainer went on: rc {rc}, {s.get('epochs')} epochs, "
                    f"{s.get('steps')} steps; decisions {s.get('decisions')} (commands {s.get('decision_commands')}, "
                    f"timeouts {s.get('timeouts')}, failures {s.get('failures_by_reason')}); conservative mode: "
                    f"entries {s.get('conservative_entries')}, skipped {s.get('decisions_skipped_conservative')}, "
                    f"probes {s.get('conservative_probes')} ({s.get('conservative_probe_failures')} failed), cleared "
                    f"events {cleared}; restarted worker answered {resumed:g} while the run went on")
        return verdict(problems, evidence)


async def drill_fallback_rejection() -> DrillResult:
    """Urza holds the catalogue but no kernel at all: every germination Tamiyo orders must fail
    explicitly (KernelArtifactError → germination_failed → culled), with nothing grafted."""
    with _fleet() as (fleet, server):
        fleet.start("urza", "esper.urza", "run")
        fleet.start("tamiyo", "esper.tamiyo", "run", TAMIYO_METADATA_TIMEOUT_MS="500")
        trainer = fleet.start("tolaria", "esper.tolaria", "run", TOLARIA_EPOCHS="4", TOLARIA_DECISION_MODE="sync",
                              TAMIYO_STEP_TIMEOUT_MS="200", TOLARIA_EMERGENCY_ENABLED="false")
        rc = await _wait_exit(trainer, WAIT_S * 2)
        s = fleet.summary()
        events = _events(server.url, "both")
        failed = [e for e in events if e.get("event") == "germination_failed"]
        rejected = [e for e in events
                    if e.get("event") == "gate_failure" and e.get("reason") == "fallback_status_rejected"]
        attached = [e for e in events if e.get("event") == "kernel_attached"]
        reasons = sorted({e.get("reason", "") for e in failed})
        problems = []
        if rc != 0 or s.get("epochs") != 4:
            problems.append(f"trainer rc {rc}, epochs {s.get('epochs')}: {fleet.tail('tolaria')}")
        if not s.get("commands_by_type", {}).get("COMMAND_SEED"):
            problems.append(f"Tamiyo ordered no germination ({s.get('commands_by_type')})")
        if not failed or reasons != ["artifact_not_found"]:
            problems.append(f"germination_failed events {len(failed)} with reasons {reasons}")
        if (len(rejected) != len(failed) or {e.get("gate") for e in rejected} != {"G4_SYSTEM_IMPACT"}
                or {e.get("fetch_reason") for e in rejected} != {"artifact_not_found"}):
            problems.append(f"{len(rejected)} G4 fallback_status_rejected gate failures for {len(failed)} failed "
                            f"germinations: {rejected[:3]}")
        if attached:
            problems.append(f"a kernel was attached without one in Urza: {attached[:3]}")
        if s.get("seed_parameters") != 0 or s.get("seeds_culled", 0) < len(failed) or s.get("seeds_fossilized"):
            problems.append(f"seed parameters {s.get('seed_parameters')}, culled {s.get('seeds_culled')}, "
                            f"fossilized {s.get('seeds_fossilized')}")
        evidence = (f"rc {rc}; {s.get('epochs')} epochs; commands {s.get('commands_by_type')}; germination_failed "
                    f"events {len(failed)} (reasons {reasons}), G4 fallback_status_rejected gate failures "
                    f"{len(rejected)}, kernels attached {len(attached)}; seeds culled {s.get('seeds_culled')}, "
                    f"seed parameters {s.get('seed_parameters')}, by stage {s.get('seeds_by_stage')}")
        return verdict(problems, evidence)


DRILLS: dict[str, Drill] = {"emergency": drill_emergency, "tamiyo_crash": drill_tamiyo_crash,
                            "fallback_rejection": drill_fallback_rejection}


def run_drills(name: str) -> int:
    return core_drills.run_drills(DRILLS, name, service="tolaria", timeout_s=DRILL_TIMEOUT_S)
