"""`python -m esper.urza run` as a real process: Karn seeding, a kernel request, /healthz, heartbeat, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from redis.asyncio import Redis

from esper.core.heartbeat import check_health
from esper.core.redis_server import free_port
from esper.karn.catalogue import get_template
from esper.karn.template import SlotShape
from esper.leyline import pb
from esper.urza.artifact import pack_artifact
from esper.urza.library import UrzaLibrary
from tests.conftest import ClientFactory
from tests.oona._helpers import wait_until
from tests.urza._service import kernel_request

ROOT = Path(__file__).resolve().parents[2]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except OSError:
        return 0


async def test_urza_process_answers_and_drains_on_sigterm(redis_url: str, secret: str, make_client: ClientFactory,
                                                          tmp_path: Path) -> None:
    db, art = tmp_path / "catalog.db", tmp_path / "artifacts"
    template, slot = get_template("BP001"), SlotShape(32)
    with UrzaLibrary(db, art) as tezzeret:  # a kernel registered before Urza starts
        params = template.resolve_params()
        rec = tezzeret.register_kernel("BP001", slot, pack_artifact("BP001", slot, params,
                                                                      template.build(slot, params).state_dict()),
                                       compile_ms=5, prewarm_p50_ms=0.1, prewarm_p95_ms=0.2)
    port = free_port()
    env = {**os.environ, "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secret,
           "ESPER_METRICS_PORT": str(port), "ESPER_HEARTBEAT_INTERVAL_S": "0.2", "ESPER_HEARTBEAT_TTL_S": "2",
           "URZA_DATABASE_URL": f"sqlite:///{db}", "URZA_ARTIFACT_DIR": str(art), "URZA_SEED_SLOT": "v32"}
    proc = subprocess.Popen([sys.executable, "-m", "esper.urza", "run"], env=env, cwd=ROOT,  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = Redis.from_url(redis_url)
    kasmina = await make_client("kasmina")
    try:
        async def healthy() -> bool:
            return await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/healthz") == 200

        await wait_until(healthy, timeout_s=30, what="urza healthy")
        reply = await kasmina.request("kernel.request", kernel_request("p1", "BP001@v32"), timeout_ms=5000)
        assert reply.message_as(pb.KernelArtifactReady).checksum == rec.checksum
        query = await kasmina.request("blueprint.query", pb.BlueprintQuery(request_id="q", blueprint_ids=["BP001"],
                                                                           include_graph=True), timeout_ms=5000)
        [entry] = query.message_as(pb.BlueprintCatalog).entries
        assert entry.descriptor.name == template.name and entry.HasField("graph")  # seeded from Karn on start
        assert await check_health(r, "urza"), "no live heartbeat"
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b"urza stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await r.aclose()


def test_bad_database_url_is_a_clear_error(redis_url: str, secret: str) -> None:
    env = {**os.environ, "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secret,
           "URZA_DATABASE_URL": "postgres://nope"}
    proc = subprocess.run([sys.executable, "-m", "esper.urza", "run"], env=env, cwd=ROOT, capture_output=True,
                          timeout=60)
    assert proc.returncode == 2
    assert b"URZA_DATABASE_URL must be sqlite" in proc.stdout + proc.stderr
