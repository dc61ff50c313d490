"""`promtool` (Debian package `prometheus`) on deploy/prometheus and on every dashboard query."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import _deploy as d

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_config_is_valid() -> None:
    out = _promtool("check", "config", d.PROMETHEUS_CONFIG.name, cwd=d.PROMETHEUS_CONFIG.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_alert_rules_are_valid() -> None:
    out = _promtool("check", "rules", d.ALERT_RULES.name, cwd=d.ALERT_RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(d.alert_rules())} rules found" in out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check is live: a PromQL syntax error fails it."""
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]}))
    assert _promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0


def test_every_rule_is_labelled_and_named_once() -> None:
    rules = d.alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r["alert"].startswith("Esper"), r["alert"]
        assert r.get("annotations", {}).get("summary"), f"{r['alert']} has no summary"
        severity = r.get("labels", {}).get("severity")
        # EsperNissaAlertFiring takes its severity from Nissa's own series (esper_alert_firing{severity}).
        assert severity in {"critical", "warning"} or "severity" in r["expr"], f"{r['alert']}: severity {severity}"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each panel query (Grafana variables substituted) as a recording rule: promtool parses them all."""
    queries = d.panel_queries()
    rules = [{"record": f"esper:panel_{i}", "expr": d.as_promql(q.expr)} for i, q in enumerate(queries)]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = _promtool("check", "rules", "panels.yml", cwd=tmp_path)
    if out.returncode != 0:
        bad = {int(i) for i in re.findall(r"esper:panel_(\d+)", out.stdout + out.stderr)}
        pytest.fail(f"{out.stdout}{out.stderr}\n" + "\n".join(queries[i].where for i in sorted(bad)))
    assert len(queries) > 60
