"""`esper drill NAME|all`: every service's drills plus the fleet drills, one PASS/FAIL table.

Service drills run as `python -m esper.<name> drill all` (Weatherlight imports no service); their
`PASS|FAIL name: evidence [t s]` lines are collected. Fleet drills run a real fleet under the
Supervisor (private Redis with AOF, real service processes, the trainer):

`redis_restart`: Redis is restarted while the trainer runs. Pass: the trainer finishes every epoch
(exit 0), decisions resume after the restart, no service needed a restart, and every field report
Tamiyo published is in Simic's replay store (none lost).

`bad_input`: thousands of fuzzed and tampered entries (byte flips, truncations, random bytes, forged
key, unsigned, stale, from the future, no payload, wrong message type) are written straight into
the live streams while the trainer runs (10 ms steps). Pass: exactly one dead letter per entry per
live consumer group, nothing left pending, no process died, the trainer finishes with decisions after
the attack.

Pass criteria are counts and invariants; time limits only bound a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from esper.core.drills import Drill, DrillResult, run_drill, verdict
from esper.core.probe import scrape_total
from esper.leyline import CHANNELS, DEADLETTER_STREAM, EnvelopeError, decode_envelope, pb, unpack_as
from esper.oona.client import decode_id
from esper.weatherlight.fleet import resolve
from esper.weatherlight.fuzz import hostile_entries
from esper.weatherlight.settings import WeatherlightSettings
from esper.weatherlight.supervisor import Supervisor

SERVICE_DRILLS: dict[str, str] = {"oona": "esper.oona", "tamiyo": "esper.tamiyo", "tolaria": "esper.tolaria"}
"""Services whose own drills `esper drill all` runs, in this order."""

DRILL_TIMEOUT_S = 300.0  # liveness only
WAIT_S = 120.0
_LINE = re.compile(r"^(PASS|FAIL) (\S+): (.*) \[([\d.]+) s\]$")

# A small, fast fleet: 16-wide slots, sync decisions (one per step), no emergency escalation from
# timeouts (these drills are about the bus, not the trainer's emergency ladder), and a short decision
# breaker reset: a run of a few seconds must see Tamiyo again after conservative mode (default 5 s).
DRILL_ENV: dict[str, str] = {
    "ESPER_LOG_LEVEL": "WARNING", "URZA_SEED_SLOT": "v16", "TEZZERET_SLOTS": '["v16"]', "TOLARIA_HIDDEN_WIDTH": "16",
    "TOLARIA_DECISION_MODE": "sync", "TAMIYO_STEP_TIMEOUT_MS": "200", "TAMIYO_METADATA_TIMEOUT_MS": "500",
    "TOLARIA_EMERGENCY_ENABLED": "false", "TOLARIA_DECISION_BREAKER_RESET_S": "0.5",
}


@dataclass(frozen=True, slots=True)
class DrillRow:
    name: str
    ok: bool
    evidence: str
    seconds: float


# -- service drills --------------------------------------------------------------------------------
def run_service_drills(service: str, name: str = "all", *,
                       echo: Callable[[DrillRow], None] = lambda _r: None) -> list[DrillRow]:
    """`python -m esper.<service> drill <name>`, streamed; a crash without FAIL lines is a FAIL row."""
    module = SERVICE_DRILLS[service]
    rows: list[DrillRow] = []
    t0 = time.perf_counter()
    tail: list[str] = []
    with subprocess.Popen([sys.executable, "-m", module, "drill", name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _LINE.match(line.rstrip("\n"))
            if m:
                row = DrillRow(f"{service}.{m[2]}", m[1] == "PASS", m[3], float(m[4]))
                rows.append(row)
                echo(row)
            else:
                tail = [*tail, line.rstrip()][-20:]
    code = proc.wait()
    if code != 0 and not any(not r.ok for r in rows):
        row = DrillRow(f"{service}.{name}", False, f"exit code {code} with no FAIL line: {' | '.join(tail)[-800:]}",
                       time.perf_counter() - t0)
        rows.append(row)
        echo(row)
    return rows


# -- fleet drills ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def drill_fleet(services: list[str], *, trainer_env: Mapping[str, str],
                      env: Mapping[str, str] | None = None) -> AsyncIterator[Supervisor]:
    """A supervised fleet in a temp dir on a private Redis, with the emergency watch running."""
    with tempfile.TemporaryDirectory(prefix="esper-fleet-drill-") as tmp:
        settings = WeatherlightSettings(var_dir=Path(tmp), metrics_port=-1, redis_url=None, leyline_secret=None,
                                        ready_timeout_s=WAIT_S, stop_timeout_s=15.0)
        base = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_PREFIXES)}
        sup = Supervisor(settings, resolve(services), env={**base, **DRILL_ENV, **(env or {})},
                         trainer_env=trainer_env)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            await sup.start()
            tasks = [asyncio.create_task(sup.watch(stop)), asyncio.create_task(sup.emergency_consumer().run(stop))]
            yield sup
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sup.shutdown()


_SERVICE_PREFIXES = ("ESPER_", "TAMIYO_", "TOLARIA_", "URZA_", "TEZZERET_", "URABRASK_", "KASMINA_", "SIMIC_",
                     "NISSA_", "WEATHERLIGHT_")


async def _until(cond: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await cond():
            return True
        await asyncio.sleep(poll_s)
    return await cond()


async def _trainer_epoch(sup: Supervisor) -> int:
    if sup.trainer is None:
        return -1
    answer = await sup.trainer.healthz()
    return int(answer[1].get("epoch", -1)) if answer else -1


async def _metric(sup: Supervisor, service: str, name: str) -> float:
    """Sum of a metric's samples on a child's /metrics (NaN when it does not answer)."""
    return await scrape_total(sup.children[service].port, name)


def _summary(sup: Supervisor) -> dict[str, Any]:
    path = Path(sup.per_service_env["tolaria"]["TOLARIA_SUMMARY_JSON"])
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _report_ids(db: Path, where: str = "") -> set[str]:
    if not db.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return {row[0] for row in conn.execute(f"SELECT report_id FROM reports {where}")}


async def drill_redis_restart() -> DrillResult:
    epochs = 14
    async with drill_fleet(["oona", "urza", "tamiyo", "simic"], trainer_env={"TOLARIA_EPOCHS": str(epochs)}) as sup:
        summary_path = sup.var_dir / "tolaria/summary.json"
        trainer = sup.start_trainer({"TOLARIA_SUMMARY_JSON": str(summary_path)})
        problems: list[str] = []
        if not await _until(lambda: _epoch_at_least(sup, 3)):
            problems.append(f"trainer never reached epoch 3: {trainer.tail()}")
        before = await _metric(sup, "tamiyo", "tamiyo_decisions_total")
        assert sup.redis is not None
        t0 = time.perf_counter()
        await asyncio.to_thread(sup.redis.restart)
        outage_ms = (time.perf_counter() - t0) * 1000
        resumed = await _until(lambda: _decisions_above(sup, before + 20), timeout_s=WAIT_S)
        after = await _metric(sup, "tamiyo", "tamiyo_decisions_total")
        finished = await _until(lambda: _flag(sup.trainer_done.is_set()), timeout_s=WAIT_S * 2)
        pending_zero = await _until(lambda: _metric_is(sup, "tamiyo", "tamiyo_field_reports_pending", 0.0))
        dropped = await _metric(sup, "tamiyo", "tamiyo_field_reports_dropped_total")
        tamiyo_db = sup.var_dir / "tamiyo/field_reports.db"
        simic_db = sup.var_dir / "simic/replay.db"
        published = _report_ids(tamiyo_db, "WHERE state = 'published'")

        async def all_stored() -> bool:
            return published <= await asyncio.to_thread(_report_ids, simic_db)

        stored_all = await _until(all_stored)
        stored = _report_ids(simic_db)
        restarts = dict(sup.outcome.restarts)
        s = _summary(sup) if summary_path.exists() else {}
    if not resumed:
        problems.append(f"decisions did not resume after the restart ({before:g} before, {after:g} after)")
    if not finished or sup.outcome.trainer_exit != 0 or s.get("epochs") != epochs:
        problems.append(f"trainer exit {sup.outcome.trainer_exit}, epochs {s.get('epochs')} of {epochs}")
    if restarts:
        problems.append(f"services restarted (they should reconnect): {restarts}")
    missing = published - stored
    if not (pending_zero and dropped == 0 and stored_all and published and not missing):
        problems.append(f"field reports: {len(published)} published, {len(missing)} missing from Simic, "
                        f"{dropped:g} dropped, outbox drained={pending_zero}")
    evidence = (f"Redis restarted at epoch >= 3 (down {outage_ms:.0f} ms, AOF); Tamiyo decisions {before:g} before, "
                f"{after:g} after; trainer exit {sup.outcome.trainer_exit}, {s.get('epochs')} epochs, decisions "
                f"{s.get('decisions')} (commands {s.get('decision_commands')}, timeouts {s.get('timeouts')}); "
                f"field reports: {len(published)} published, {len(stored)} in Simic's store, {len(missing)} lost, "
                f"{dropped:g} dropped; restarts {restarts or 'none'}")
    return verdict(problems, evidence)


async def _flag(value: bool) -> bool:
    return value


async def _epoch_at_least(sup: Supervisor, n: int) -> bool:
    return await _trainer_epoch(sup) >= n


async def _decisions_above(sup: Supervisor, n: float) -> bool:
    return await _metric(sup, "tamiyo", "tamiyo_decisions_total") >= n


async def _metric_is(sup: Supervisor, service: str, name: str, value: float) -> bool:
    return await _metric(sup, service, name) == value


# Streams the fleet consumes, and how many hostile entries go into each (thousands in all).
FUZZ_TARGETS: dict[str, tuple[str, int]] = {
    "state": ("normal", 600), "telemetry": ("normal", 400), "field_report": ("normal", 400),
    "kernel.request": ("normal", 300), "blueprint.query": ("normal", 300), "bsds": ("normal", 200),
    "emergency": ("emergency", 200),
}


def _live_groups(r: redis.Redis, stream: str, channel_groups: tuple[str, ...], running: set[str]) -> list[str]:
    """The channel's groups read by a running process (groups are named after the service that reads
    them; Redis's own consumer count is no guide, as consumers appear only once they were served)."""
    try:
        groups: Any = r.xinfo_groups(stream)
    except redis.ResponseError:
        return []
    present = {decode_id(g["name"]) for g in groups}
    return [g for g in channel_groups if g in present and g in running]


def _settled(r: redis.Redis, streams: Mapping[str, list[str]]) -> bool:
    for stream, names in streams.items():
        groups: Any = r.xinfo_groups(stream)
        for g in groups:
            if decode_id(g["name"]) in names and (int(g.get("pending", 0)) or int(g.get("lag") or 0)):
                return False
    return True


async def drill_bad_input() -> DrillResult:
    services = ["oona", "urza", "tamiyo", "simic"] + (["nissa"] if _has_module("esper.nissa") else [])
    epochs = 12
    # Steps as long as a small real model's (10 ms): the flood delays Tamiyo's replies past the 200 ms
    # budget, three timeouts open the trainer's decision breaker, and a bare digits step (~0.3 ms) would
    # finish the run before the first probe 0.5 s later; then "decisions after the attack" measured
    # how fast the trainer is, not whether Tamiyo recovered (it failed 7 of 11 local runs that way).
    trainer_env = {"TOLARIA_EPOCHS": str(epochs), "ESPER_ENABLE_FAULT_INJECTION": "1",
                   "TOLARIA_FAULT_STEP_DELAY_MS": "10"}
    async with drill_fleet(services, trainer_env=trainer_env) as sup:
        assert sup.client is not None
        summary_path = sup.var_dir / "tolaria/summary.json"
        trainer = sup.start_trainer({"TOLARIA_SUMMARY_JSON": str(summary_path)})
        problems: list[str] = []
        if not await _until(lambda: _epoch_at_least(sup, 1)):
            problems.append(f"trainer never reached epoch 1: {trainer.tail()}")
        r = redis.Redis.from_url(sup.redis_url)
        try:
            rng = random.Random(1234)
            live: dict[str, list[str]] = {}
            injected: dict[str, list[str]] = {}
            cases: Counter[str] = Counter()
            newest: Any = r.xrevrange(DEADLETTER_STREAM, count=1)
            since = "(" + decode_id(newest[0][0]) if newest else "-"
            for name, (lane, count) in FUZZ_TARGETS.items():
                stream = CHANNELS[name].stream("emergency" if lane == "emergency" else "normal")
                live[stream] = _live_groups(r, stream, CHANNELS[name].groups, {*sup.children, "weatherlight"})
                pipe = r.pipeline(transaction=False)
                for case, fields in hostile_entries(name, sup.client.keys, count=count, rng=rng):
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
                    cases[case] += 1
                injected[stream] = [decode_id(i) for i in pipe.execute()]
            decisions_at_attack = await _metric(sup, "tamiyo", "tamiyo_decisions_total")
            settled = await _until(lambda: asyncio.to_thread(_settled, r, live), timeout_s=WAIT_S)
            finished = await _until(lambda: _flag(sup.trainer_done.is_set()), timeout_s=WAIT_S * 2)
            decisions_end = await _metric(sup, "tamiyo", "tamiyo_decisions_total")
            alive = {n: c.alive() for n, c in sup.children.items() if not c.spec.job}
            restarts = dict(sup.outcome.restarts)
            rows: Any = r.xrange(DEADLETTER_STREAM, min=since)
            records = [_dead_letter_key(fields) for _id, fields in rows]
        finally:
            r.close()
        s = _summary(sup) if summary_path.exists() else {}
    want = {(stream, eid, group) for stream, ids in injected.items() for eid in ids for group in live[stream]}
    got = Counter((stream, eid, group) for stream, eid, group, _reason in records)
    reasons = Counter(reason for stream, eid, group, reason in records if (stream, eid, group) in want)
    others = Counter(f"{stream} {reason}" for stream, eid, group, reason in records if (stream, eid, group) not in want)
    off = Counter(f"{stream}/{group}" for stream, eid, group in want if got[(stream, eid, group)] != 1)
    if not settled:
        problems.append("consumer groups still had pending or undelivered hostile entries")
    if off:
        problems.append(f"hostile entries not dead-lettered exactly once, by stream/group: {dict(off)}")
    if not all(alive.values()) or restarts:
        problems.append(f"processes died: alive {alive}, restarts {restarts}")
    if not finished or sup.outcome.trainer_exit != 0 or s.get("epochs") != epochs:
        problems.append(f"trainer exit {sup.outcome.trainer_exit}, epochs {s.get('epochs')} of {epochs}")
    if not decisions_end > decisions_at_attack:
        problems.append(f"no decision after the attack ({decisions_at_attack:g} -> {decisions_end:g})")
    evidence = (f"{sum(cases.values())} hostile entries into {len(FUZZ_TARGETS)} live streams ({dict(cases)}); "
                f"live groups {({k: v for k, v in live.items() if v})}; {len(want) - sum(off.values())} of "
                f"{len(want)} dead-lettered exactly once per live group, reasons {dict(reasons)}; other dead "
                f"letters meanwhile {dict(others) or 'none'}; processes alive {all(alive.values())}, restarts "
                f"{restarts or 'none'}; Tamiyo decisions {decisions_at_attack:g} at the attack, {decisions_end:g} at "
                f"the end; trainer exit {sup.outcome.trainer_exit}, {s.get('epochs')} epochs, decisions "
                f"{s.get('decisions')} (timeouts {s.get('timeouts')}, conservative entries "
                f"{s.get('conservative_entries')}, skipped {s.get('decisions_skipped_conservative')})")
    return verdict(problems, evidence)


def _dead_letter_key(fields: Mapping[bytes, bytes]) -> tuple[str, str, str, str]:
    """(source stream, source entry id, group, reason) of a dead-letter entry, from its signed record."""
    reason = fields.get(b"reason", b"?").decode(errors="replace")
    try:
        record = unpack_as(decode_envelope(fields[b"payload"], max_bytes=1 << 30), pb.DeadLetterRecord)
    except (KeyError, EnvelopeError):
        return fields.get(b"source", b"?").decode(errors="replace"), "?", "?", reason
    return record.source_stream, record.source_entry_id, record.group, reason


async def drill_up() -> DrillResult:
    """`esper up --epochs 3 --summary-json`: the whole default fleet to a summary, exit 0, nothing left."""
    from esper.weatherlight.summary import REQUIRED_KEYS

    epochs = 3
    with tempfile.TemporaryDirectory(prefix="esper-up-drill-") as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICE_PREFIXES)}
        env = {**base, **DRILL_ENV, "WEATHERLIGHT_VAR_DIR": tmp, "ESPER_LOG_LEVEL": "WARNING"}
        out = Path(tmp) / "summary.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "esper.weatherlight", "up", "--epochs", str(epochs), "--summary-json", str(out),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await proc.communicate()
        summary = json.loads(out.read_text()) if out.exists() else {}
        fleet = json.loads((Path(tmp) / "fleet.json").read_text()) if (Path(tmp) / "fleet.json").exists() else {}
    pids = {name: s["pid"] for name, s in fleet.get("services", {}).items()}
    left = sorted(name for name, pid in pids.items() if pid and _pid_alive(pid))
    redis_left = _redis_alive(fleet.get("redis_url", ""))
    problems: list[str] = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {output.decode(errors='replace')[-1500:]}")
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing or summary.get("epochs") != epochs or summary.get("clean_shutdown") is not True:
        problems.append(f"summary missing {missing}, epochs {summary.get('epochs')}, clean "
                        f"{summary.get('clean_shutdown')}")
    if left or redis_left or len(pids) < 2:
        problems.append(f"processes left behind: {left}, redis alive {redis_left}, services seen {sorted(pids)}")
    evidence = (f"exit {proc.returncode}; {len(pids)} services ({', '.join(sorted(pids))}); summary epochs "
                f"{summary.get('epochs')}, val accuracy {summary.get('final_val_accuracy')}, decisions "
                f"{summary.get('decisions')} (p50 {summary.get('decision_p50_ms')} ms), timeouts "
                f"{summary.get('timeouts')}, dead letters {summary.get('dead_letters')}, clean shutdown "
                f"{summary.get('clean_shutdown')}; processes left {left or 'none'}, redis left {redis_left}")
    return verdict(problems, evidence)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _redis_alive(url: str) -> bool:
    if not url:
        return False
    try:
        with redis.Redis.from_url(f"redis://{url.removeprefix('redis://')}", socket_connect_timeout=0.5) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


FLEET_DRILLS: dict[str, Drill] = {"up": drill_up, "redis_restart": drill_redis_restart, "bad_input": drill_bad_input}


def known_drills() -> list[str]:
    return [*SERVICE_DRILLS, *(f"fleet.{n}" for n in FLEET_DRILLS)]


def run_all(name: str, *, echo: Callable[[DrillRow], None]) -> list[DrillRow] | None:
    """Run `name`: 'all', a service ('oona' = all its drills), 'oona.bad-input', or 'fleet[.drill]'.
    Returns None for an unknown name."""
    service, _, sub = name.partition(".")
    if name == "all":
        rows = [row for svc in SERVICE_DRILLS for row in run_service_drills(svc, echo=echo)]
        return rows + _run_fleet(list(FLEET_DRILLS), echo)
    if service in SERVICE_DRILLS:
        return run_service_drills(service, sub or "all", echo=echo)
    if service == "fleet" and (not sub or sub in FLEET_DRILLS):
        return _run_fleet([sub] if sub else list(FLEET_DRILLS), echo)
    return None


def _run_fleet(names: list[str], echo: Callable[[DrillRow], None]) -> list[DrillRow]:
    rows = []
    for n in names:
        t0 = time.perf_counter()
        ok, evidence = run_drill(FLEET_DRILLS[n], timeout_s=DRILL_TIMEOUT_S)
        rows.append(DrillRow(f"fleet.{n}", ok, evidence, time.perf_counter() - t0))
        echo(rows[-1])
    return rows
