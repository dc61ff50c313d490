"""The `esper` CLI's own commands (exit codes scripts can trust), through typer's runner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.leyline import pb
from esper.weatherlight.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_user_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ESPER_REDIS_URL", "ESPER_LEYLINE_SECRET", "TAMIYO_POLICY_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("args", [["drill", "nonsense"], ["drill", "fleet.nonsense"], ["service", "nonsense"],
                                  ["bench", "nonsense"]])
def test_unknown_names_exit_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "unknown" in result.output


def test_streams_needs_a_bus() -> None:
    result = runner.invoke(app, ["streams"])
    assert result.exit_code == 2 and "ESPER_REDIS_URL" in result.output


async def test_streams_json_reads_a_real_bus(redis_url: str, make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client("cli-test")
    await client.publish("telemetry", pb.TelemetryPacket(packet_id="t1", source_subsystem="test"))
    result = runner.invoke(app, ["streams", "--json"], env={"ESPER_REDIS_URL": redis_url})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    telemetry = [s for s in report["streams"] if s["channel"] == "telemetry" and s["lane"] == "normal"]
    assert telemetry[0]["length"] == 1 and report["dead_letters"] == 0


def test_policy_show_reports_absent_present_and_tampered(tmp_path: Path) -> None:
    absent = runner.invoke(app, ["policy", "show", "--policy-dir", str(tmp_path)])
    assert absent.exit_code == 1 and '"present": false' in absent.output
    data = b"weights"
    (tmp_path / "abc.pt").write_bytes(data)
    (tmp_path / "current.json").write_text(json.dumps({
        "format": 1, "file": "abc.pt", "sha256": hashlib.sha256(data).hexdigest(), "policy_version": "v7",
        "policy_id": "p7", "issued_at_ms": 1}))
    shown = runner.invoke(app, ["policy", "show", "--policy-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    disk = json.loads(shown.output)["disk"]
    assert disk["policy_version"] == "v7" and disk["sha256_ok"] is True
    (tmp_path / "abc.pt").write_bytes(b"tampered")
    tampered = json.loads(runner.invoke(app, ["policy", "show", "--policy-dir", str(tmp_path)]).output)
    assert tampered["disk"]["sha256_ok"] is False


def test_policy_publish_refuses_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["policy", "publish", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "not a file" in result.output


def test_policy_publish_then_show_through_the_real_bus(tmp_path: Path, redis_url: str, secret: str) -> None:
    """`esper policy publish` (a real process: Simic's signer) puts a PolicyUpdate on `policy`;
    `esper policy show` finds it and verifies its signature with the fleet's secret."""
    import subprocess
    import sys

    from esper.simic.pipeline import initial_model
    from esper.tamiyo.checkpoint import encode_checkpoint
    from esper.tamiyo.registry import RegistrySet

    path = tmp_path / "policy.pt"
    path.write_bytes(encode_checkpoint(initial_model(), RegistrySet.new(), policy_version="cli-test-1"))
    env = {"PATH": "/usr/bin:/bin", "ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secret,
           "ESPER_LOG_LEVEL": "ERROR"}
    published = subprocess.run([sys.executable, "-m", "esper.weatherlight", "policy", "publish", str(path)], env=env,
                               capture_output=True, text=True, timeout=120)
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout.strip().splitlines()[-1])["policy_version"] == "cli-test-1"
    shown = runner.invoke(app, ["policy", "show", "--policy-dir", str(tmp_path / "none")],
                          env={"ESPER_REDIS_URL": redis_url, "ESPER_LEYLINE_SECRET": secret})
    bus = json.loads(shown.output)["bus"]
    assert bus["updates"] == 1
    assert bus["newest"]["tamiyo_policy_version"] == "cli-test-1" and bus["newest"]["signature_verified"] is True
