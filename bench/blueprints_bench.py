"""Blueprint supply benchmark: Tezzeret compile time per template, and kernel fetch through Oona.

Run: `.venv/bin/python bench/blueprints_bench.py --out bench/results/blueprints.json` (`make bench-blueprints`).

- compile (`compile_ms_*`): one Tezzeret forge pass over every Karn template that fits the slot
  (build, validate, warm-up, pack, register in Urza), per-template times from the forge report.
- kernel fetch (`fetch_*`): a real Urza *process* (`python -m esper.urza`) on a private redis-server;
  this process acts as Kasmina: `OonaClient.request("kernel.request", KernelPrefetchRequest)` →
  `KernelArtifactReady`, then the artifact. *Cold*: the artifact is read from the store, checksum and
  guard digest verified, `weights_only` loaded and the module rebuilt from Karn. *Cached*: the
  requester already holds that artifact (an LRU keyed by checksum), so only the round trip and a lookup.
- baseline (`raw_rr_*`): the same request bytes bounced by a raw redis-py responder *process*
  (XREAD BLOCK → XADD) read with XREAD BLOCK: what Redis and two processes cost without Oona or Urza.
  Cold/cached/raw are timed in interleaved blocks so a noisy moment hits all of them.

Nothing is asserted; goals are recorded as flags (cached p95 ≤ 2 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import uvloop
from redis.asyncio import Redis

from esper.core.clock import now_ms
from esper.core.redis_server import EmbeddedRedis
from esper.karn import CATALOGUE, SlotShape
from esper.leyline import new_message_id, pb
from esper.oona import OonaClient, OonaSettings
from esper.tezzeret.forge import forge_once
from esper.urza.artifact import rebuild
from esper.urza.library import UrzaLibrary
from esper.urza.store import ArtifactStore

try:
    from bench.benchlib import git_state, percentile, redis_version
except ImportError:  # run as a script: bench/ is on sys.path
    from benchlib import git_state, percentile, redis_version  # type: ignore[import-not-found,no-redef]

SLOT = SlotShape(64)
ROUNDS = 8
RAW_RESPONDER = """
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
last = "$"
while True:
    got = r.xread({"bench.raw.req": last}, block=1000, count=1)
    for _stream, entries in got or []:
        for eid, fields in entries:
            last = eid
            if fields.get(b"stop"):
                sys.exit(0)
            r.xadd(fields[b"reply_to"].decode(), {b"payload": fields[b"payload"]})
"""


def _ms(samples: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(samples, 50), "p95": percentile(samples, 95), "n": float(len(samples))}


class Kasmina:
    """The requester side: prefetch over Oona, then load from the store unless cached."""

    def __init__(self, client: OonaClient, store: ArtifactStore, cache_size: int = 64) -> None:
        self.client = client
        self.store = store
        self.cache: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self.cache_size = cache_size

    async def fetch(self, kernel: str) -> torch.nn.Module:
        req = pb.KernelPrefetchRequest(request_id=new_message_id(), blueprint_id=kernel, training_run_id="bench")
        req.issued_at.FromMilliseconds(now_ms())
        reply = await self.client.request("kernel.request", req, timeout_ms=5000)
        ready = reply.message_as(pb.KernelArtifactReady)
        hit = self.cache.get(ready.checksum)
        if hit is not None:
            self.cache.move_to_end(ready.checksum)
            return hit
        artifact = self.store.load(ready.artifact_ref, ready.checksum, expected_guard_digest=ready.guard_digest)
        module = rebuild(artifact)
        self.cache[ready.checksum] = module
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return module


async def _raw_rr(redis: Redis, payload: bytes, n: int) -> list[float]:
    reply_to = f"bench.raw.reply.{secrets.token_hex(4)}"
    out: list[float] = []
    last = "0"
    for _ in range(n):
        t0 = time.perf_counter()
        await redis.xadd("bench.raw.req", {b"payload": payload, b"reply_to": reply_to.encode()})
        got = await redis.xread({reply_to: last}, block=5000, count=1)
        last = got[0][1][0][0]
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def forge(var: Path) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """One Tezzeret pass into a fresh Urza catalogue: kernel ids, compile ms per template, failures."""
    with UrzaLibrary(var / "catalog.db", var / "artifacts") as lib:
        lib.seed_from_karn(SLOT)
        report = forge_once(lib, [SLOT], device=torch.device("cpu"), compile_enabled=False, seed=0, max_attempts=2)
    return ([r.kernel_id for r in report.registered], {r.blueprint_id: r.compile_ms for r in report.results},
            report.failed)


def spawn(var: Path, url: str, secret: str) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """The Urza process and the raw redis-py responder process."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "URZA_"))},
           "ESPER_REDIS_URL": url, "ESPER_LEYLINE_SECRET": secret, "ESPER_METRICS_PORT": "-1",
           "ESPER_LOG_LEVEL": "WARNING", "URZA_DATABASE_URL": f"sqlite:///{var / 'catalog.db'}",
           "URZA_ARTIFACT_DIR": str(var / "artifacts"), "URZA_SEED_KARN": "false"}
    urza = subprocess.Popen([sys.executable, "-m", "esper.urza"], env=env, cwd=var, stdout=subprocess.DEVNULL)
    raw = subprocess.Popen([sys.executable, "-c", RAW_RESPONDER, url], stdout=subprocess.DEVNULL)
    return urza, raw


async def measure(var: Path, url: str, secret: str, kernels: list[str]) -> dict[str, list[float]]:
    settings = OonaSettings(redis_url=url, leyline_secret=secret, metrics_port=-1)
    cold: list[float] = []
    cached: list[float] = []
    raw_rr: list[float] = []
    async with OonaClient.from_settings(settings, sender="bench-kasmina") as client:
        kasmina = Kasmina(client, ArtifactStore(var / "artifacts"))
        deadline = time.monotonic() + 60
        while True:  # Urza ready: answers a request
            try:
                await kasmina.fetch(kernels[0])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        probe = pb.KernelPrefetchRequest(request_id=new_message_id(), blueprint_id=kernels[0])
        probe.issued_at.FromMilliseconds(now_ms())
        payload = client.seal(probe)[1]
        await _raw_rr(client.redis, payload, 20)  # warm-up
        for _ in range(ROUNDS):
            kasmina.cache.clear()
            for k in kernels:
                t0 = time.perf_counter()
                await kasmina.fetch(k)
                cold.append((time.perf_counter() - t0) * 1000.0)
            for k in kernels * 3:
                t0 = time.perf_counter()
                await kasmina.fetch(k)
                cached.append((time.perf_counter() - t0) * 1000.0)
            raw_rr += await _raw_rr(client.redis, payload, len(kernels) * 3)
        await client.redis.xadd("bench.raw.req", {b"stop": b"1"})
    return {"cold": cold, "cached": cached, "raw": raw_rr}


def run(var: Path, url: str, secret: str) -> dict[str, Any]:
    kernels, compile_ms, failed = forge(var)
    urza, raw = spawn(var, url, secret)
    try:
        samples = uvloop.run(measure(var, url, secret, kernels))
    finally:
        urza.terminate()
        urza.wait(15)
        if raw.poll() is None:
            raw.kill()
        raw.wait(15)
    c, h, r = _ms(samples["cold"]), _ms(samples["cached"]), _ms(samples["raw"])
    return {
        "templates": len(CATALOGUE), "kernels_compiled": len(kernels), "slot": SLOT.as_key(),
        "compile_ms_max": max(compile_ms.values()), "compile_ms_p50": percentile(list(compile_ms.values()), 50),
        "compile_ms_by_template": compile_ms, "compile_failed": failed,
        "fetch_cold_p50_ms": c["p50"], "fetch_cold_p95_ms": c["p95"], "fetch_cold_n": c["n"],
        "fetch_cached_p50_ms": h["p50"], "fetch_cached_p95_ms": h["p95"], "fetch_cached_n": h["n"],
        "raw_rr_p50_ms": r["p50"], "raw_rr_p95_ms": r["p95"], "raw_rr_n": r["n"],
        "goal_fetch_cached_p95_ms": 2.0, "goal_fetch_cached_met": h["p95"] <= 2.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/blueprints.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    server = EmbeddedRedis()
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="esper-bench-blueprints-") as tmp:
            result = run(Path(tmp), server.url, secrets.token_hex(16))
        result.update(git_state())
        result.update({"redis_version": redis_version(server.url), "torch": str(torch.__version__),
                       "python": sys.version.split()[0], "when": dt.datetime.now(dt.UTC).isoformat(),
                       "cpu_count": os.cpu_count()})
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    keys = ("templates", "compile_ms_max", "fetch_cold_p50_ms", "fetch_cold_p95_ms", "fetch_cached_p50_ms",
            "fetch_cached_p95_ms", "raw_rr_p50_ms", "raw_rr_p95_ms", "goal_fetch_cached_met")
    for k in keys:
        print(f"{k:24s} {result[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
