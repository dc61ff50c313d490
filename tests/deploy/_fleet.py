"""A real local fleet scraped by a real Prometheus, for the dashboard and alert-rule checks.

Every process of docker-compose.yml runs as `python -m esper.<name> run` against a private
password-protected redis-server with an AOF (as in compose), each serving /metrics on a free
loopback port. Prometheus gets deploy/prometheus/prometheus.yml with only the targets (and the
intervals, to 1 s) rewritten, and loads deploy/prometheus/alerts.yml as it is.

The run is made to exercise what the dashboards show, the way an operator would see it happen:
- a second Tamiyo worker in the same consumer group whose inference is slowed by the drill knob
  (TAMIYO_FAULT_INFERENCE_DELAY_MS): its decisions miss the budget, its breaker opens, and its HIGH
  telemetry on the emergency lane hits Oona's token bucket (ESPER_EMERGENCY_MAX_PER_MIN=1);
- the trainer gets a NaN loss at one step (TOLARIA_FAULT_NAN_AT_STEP): step failure, rollback from
  the fast tier, an ELEVATED EmergencySignal;
- one unsigned entry on the `state` stream (dead-lettered by the Tamiyo consumer that reads it) and
  one signed telemetry packet with no source (refused by Nissa).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis
import yaml

from esper.core.redis_server import EmbeddedRedis, free_port
from esper.leyline import CHANNELS, pb
from esper.oona import OonaClient, OonaSettings
from tests.deploy import _deploy as d

PROMETHEUS = shutil.which("prometheus")
ESPER_PREFIXES = ("ESPER_", "TAMIYO_", "TOLARIA_", "URZA_", "TEZZERET_", "URABRASK_", "KASMINA_", "SIMIC_", "NISSA_")
READY_TIMEOUT_S = 60.0
NAN_STEP = 300  # a few seconds into the run


@dataclass
class Proc:
    name: str
    job: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    out: IO[bytes]


@dataclass
class Fleet:
    tmp: Path
    redis: EmbeddedRedis
    secret: str
    procs: dict[str, Proc] = field(default_factory=dict)
    prometheus: subprocess.Popen[bytes] | None = None
    prometheus_port: int = 0
    _logs: list[IO[bytes]] = field(default_factory=list)

    # -- processes -------------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(ESPER_PREFIXES)}
        t = self.tmp
        return {
            **base,
            "ESPER_REDIS_URL": self.redis.url, "ESPER_LEYLINE_SECRET": self.secret,
            "ESPER_LOG_LEVEL": "WARNING", "ESPER_LOG_FORMAT": "json", "ESPER_METRICS_HOST": "127.0.0.1",
            "ESPER_KEEPER_INTERVAL_S": "1", "ESPER_HEARTBEAT_INTERVAL_S": "1", "ESPER_HEARTBEAT_TTL_S": "5",
            "URZA_DATABASE_URL": f"sqlite:///{t}/urza/catalog.db", "URZA_ARTIFACT_DIR": str(t / "urza/artifacts"),
            "URZA_SEED_SLOT": "v16", "TEZZERET_SLOTS": '["v16"]', "TOLARIA_HIDDEN_WIDTH": "16",
            "TAMIYO_VAR_DIR": str(t / "tamiyo"), "TAMIYO_POLICY_DIR": str(t / "tamiyo/policies"),
            "TAMIYO_METADATA_TIMEOUT_MS": "500", "TOLARIA_VAR_DIR": str(t / "tolaria"),
            "SIMIC_REPLAY_PATH": str(t / "simic/replay.db"), "SIMIC_POLICY_DIR": str(t / "simic/policies"),
            "NISSA_EVAL_INTERVAL_S": "1", "URABRASK_PRODUCER_INTERVAL_S": "5", "URABRASK_TOPN_PER_CYCLE": "2",
        }

    def start(self, name: str, job: str, port: int, **env: str) -> Proc:
        log = self.tmp / f"{name}.log"
        out = log.open("ab")
        self._logs.append(out)
        port_knob = "NISSA_METRICS_PORT" if job == "nissa" else "ESPER_METRICS_PORT"
        popen = subprocess.Popen([sys.executable, "-m", f"esper.{job}", "run"],
                                 env={**self.base_env(), port_knob: str(port), **env}, cwd=self.tmp,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, job, port, popen, log, out)
        self.procs[name] = proc
        return proc

    def wait_healthy(self, names: list[str], timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names:
            proc = self.procs[name]
            while True:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.popen.returncode}: {self.tail(name)}")
                if http_status(f"http://127.0.0.1:{proc.port}/healthz") == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not healthy after {timeout_s} s: {self.tail(name)}")
                time.sleep(0.2)

    def tail(self, name: str, limit: int = 1500) -> str:
        return self.procs[name].log.read_text(errors="replace")[-limit:]

    # -- faults --------------------------------------------------------------------------------------

    def inject_bad_input(self) -> None:
        """An unsigned entry on `state` and an unattributable (but signed) telemetry packet."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            client.xadd(CHANNELS["state"].stream("normal"), {b"payload": b"not a signed envelope"})
        finally:
            client.close()

        async def publish() -> None:
            settings = OonaSettings(redis_url=self.redis.url, leyline_secret=self.secret,  # type: ignore[arg-type]
                                    metrics_port=-1, _env_file=None)  # type: ignore[call-arg]
            bus = OonaClient.from_settings(settings, sender="deploy-test")
            await bus.connect()
            try:
                await bus.publish("telemetry", pb.TelemetryPacket(packet_id="deploy-test-no-source"))
            finally:
                await bus.close()

        asyncio.run(publish())

    # -- Prometheus ----------------------------------------------------------------------------------

    def start_prometheus(self, targets: Mapping[str, list[str]]) -> None:
        assert PROMETHEUS is not None
        self.prometheus_port = free_port()
        config = prometheus_config(targets, self.prometheus_port)
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        out = (self.tmp / "prometheus.log").open("ab")
        self._logs.append(out)
        self.prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={self.tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.prometheus_port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp)
        deadline = time.monotonic() + 30
        while http_status(f"{self.prometheus_url}/-/ready") != 200:
            if self.prometheus.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prometheus did not start: "
                                   + (self.tmp / "prometheus.log").read_text(errors="replace")[-1500:])
            time.sleep(0.2)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def query(self, expr: str) -> dict[str, Any]:
        """`/api/v1/query` at now: the decoded JSON (status, data or error)."""
        data = urllib.parse.urlencode({"query": expr}).encode()
        req = urllib.request.Request(f"{self.prometheus_url}/api/v1/query", data=data)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                out: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as e:  # 400/422: a parse or execution error, with a JSON body
            out = json.loads(e.read())
        return out

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.prometheus_url}{path}", timeout=10) as resp:
            return json.loads(resp.read())["data"]

    # -- shutdown ------------------------------------------------------------------------------------

    def stop(self) -> None:
        children = [p.popen for p in self.procs.values()]
        if self.prometheus is not None:
            children.append(self.prometheus)
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.wait(20)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        for f in self._logs:
            f.close()
        self.redis.stop()


def prometheus_config(targets: Mapping[str, list[str]], self_port: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with local targets, 1 s intervals and the real alert rules."""
    config: dict[str, Any] = yaml.safe_load(d.PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(d.PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        name = job["job_name"]
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        local = [f"127.0.0.1:{self_port}"] if name == "prometheus" else list(targets.get(name, []))
        if not local:
            raise AssertionError(f"prometheus.yml scrapes job {name}, which the test fleet does not run")
        job["static_configs"] = [{"targets": local}]
    missing = set(targets) - {j["job_name"] for j in config["scrape_configs"]}
    if missing:
        raise AssertionError(f"prometheus.yml does not scrape {missing}")
    return config


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def has_finite_sample(result: Mapping[str, Any]) -> bool:
    data = result.get("data", {})
    kind, values = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return math.isfinite(float(values[1]))
    return any(math.isfinite(float(s["value"][1])) for s in values or [])


def run_fleet(tmp: Path) -> Iterator[Fleet]:
    """Start everything, yield the fleet, stop everything (a generator for a pytest fixture).

    Prometheus starts first, so it sees the counters from the processes' first moments."""
    server = EmbeddedRedis(password=secrets.token_hex(16), appendonly=True)
    server.start()
    fleet = Fleet(tmp, server, secrets.token_hex(32))
    try:
        plan: list[tuple[str, str, dict[str, str]]] = [
            ("oona", "oona", {}), ("urza", "urza", {}), ("nissa", "nissa", {}), ("simic", "simic", {}),
            ("tezzeret", "tezzeret", {}), ("urabrask", "urabrask", {}),
            # The catalogue is refreshed every 2 s, so request/reply latency is observed during the run.
            ("tamiyo", "tamiyo", {"TAMIYO_METADATA_CACHE_TTL_S": "4"}),
            # A degraded replica: slow inference, a metadata budget no reply can meet, a tight token bucket.
            ("tamiyo-slow", "tamiyo", {"ESPER_ENABLE_FAULT_INJECTION": "1", "TAMIYO_FAULT_INFERENCE_DELAY_MS": "40",
                                       "TAMIYO_METADATA_TIMEOUT_MS": "0.05", "TAMIYO_METADATA_CACHE_TTL_S": "4",
                                       "ESPER_EMERGENCY_MAX_PER_MIN": "1"}),
        ]
        trainer = {"TOLARIA_EPOCHS": "100000", "TAMIYO_STEP_TIMEOUT_MS": "25", "ESPER_ENABLE_FAULT_INJECTION": "1",
                   "TOLARIA_FAULT_NAN_AT_STEP": str(NAN_STEP)}
        ports = {name: free_port() for name, _, _ in [*plan, ("tolaria", "tolaria", {})]}
        targets: dict[str, list[str]] = {}
        for name, job, _ in [*plan, ("tolaria", "tolaria", {})]:
            targets.setdefault(job, []).append(f"127.0.0.1:{ports[name]}")
        fleet.start_prometheus(targets)
        for name, job, env in plan:
            fleet.start(name, job, ports[name], **env)
        fleet.wait_healthy(["oona", "urza", "nissa", "tamiyo", "tamiyo-slow"])
        fleet.start("tolaria", "tolaria", ports["tolaria"], **trainer)
        fleet.inject_bad_input()
        fleet.wait_healthy(list(fleet.procs))
        yield fleet
    finally:
        fleet.stop()
