"""`python -m esper.oona` as a real process: groups, /metrics, /healthz, heartbeat, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from redis.asyncio import Redis

from esper.core.heartbeat import check_health
from esper.core.redis_server import free_port
from esper.leyline import CHANNELS
from tests.oona._helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


async def test_keeper_process_serves_metrics_and_drains_on_sigterm(redis_url: str, secret: str) -> None:
    port = free_port()
    env = {**os.environ, "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secret,
           "ESPER_METRICS_PORT": str(port), "ESPER_KEEPER_INTERVAL_S": "0.2",
           "ESPER_HEARTBEAT_INTERVAL_S": "0.2", "ESPER_HEARTBEAT_TTL_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "esper.oona", "run"], env=env, cwd=ROOT,  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = Redis.from_url(redis_url)
    try:
        async def healthy() -> bool:
            status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
            return status == 200

        await wait_until(healthy, timeout_s=20, what="keeper healthy")
        groups = [g["name"] for g in await r.xinfo_groups(CHANNELS["state"].stream("normal"))]
        assert b"tamiyo" in groups
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        text = body.decode()
        assert 'oona_stream_length{stream="oona.{state}"}' in text
        assert 'oona_group_pending{group="tamiyo",stream="oona.{state}"}' in text
        assert "oona_deadletter_length" in text
        assert await check_health(r, "oona"), "no live heartbeat"
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
        assert json.loads(body)["last_tick_ok"] == "true"
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b"oona keeper stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        await r.aclose()


def test_missing_secret_is_a_clear_error(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ESPER_LEYLINE_SECRET"}
    env["ESPER_REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-m", "esper.oona", "run"], env=env, cwd=ROOT, capture_output=True,
                          timeout=60)
    assert proc.returncode == 2
    assert b"ESPER_LEYLINE_SECRET is not set" in proc.stdout + proc.stderr
