"""Every dashboard query and every alert rule, evaluated by a real Prometheus scraping a real fleet.

A query passes when Prometheus parses it and it returns at least one finite sample. An alert rule
passes when it parses and either fires now, or (a threshold that should not be firing) each of its
operands, with its comparison against a number stripped, returns finite data: the rule watches
series that exist. The one exception is a rule on a telemetry event the run may not produce (a
budget overrun): there the events counter must exist and the event name must be one Nissa exports.

The fleet (tests/deploy/_fleet.py) runs every process of docker-compose.yml, with a few faults
injected so that event counters have events. Data shows up within seconds; the wait below is a
liveness bound, after which whatever still fails is reported with its expression.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from esper.core.redis_server import free_port
from esper.nissa.labels import EVENTS
from tests.deploy import _deploy as d
from tests.deploy import _fleet
from tests.deploy._fleet import Fleet, has_finite_sample

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(_fleet.PROMETHEUS is None, reason="no prometheus binary (Debian: apt-get install prometheus)"),
]

WAIT_S = 45.0  # liveness bound for every query to have data, once the fleet is healthy
_EVENTS_METRIC = "esper_telemetry_events_total"
PANELS = d.panel_queries()
RULES = d.alert_rules()


class Live:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.problems: dict[str, str] = {}
        self.waited_s = 0.0

    def panel_problem(self, q: d.PanelQuery) -> str | None:
        return self._data_problem(d.as_promql(q.expr))

    def rule_problem(self, rule: dict[str, object]) -> str | None:
        expr = str(rule["expr"]).strip()
        result = self.fleet.query(expr)
        if result.get("status") != "success":
            return f"does not evaluate: {result.get('error')}"
        if has_finite_sample(result):
            return None  # firing (or pending) right now: its series exist
        for operand in d.split_set_operands(expr):
            selector, _comparison = d.strip_comparison(operand)
            problem = self._data_problem(selector)
            if problem and _EVENTS_METRIC in selector:
                problem = self._rare_event_problem(selector)
            if problem:
                return f"{problem} (operand {selector!r} of the rule)"
        return None

    def _rare_event_problem(self, selector: str) -> str | None:
        """A rule on telemetry events that did not happen in this run (a budget overrun, say): the events
        counter must exist once the `event` matcher is dropped, and every event name matched must be
        one Nissa keeps as a label value; any other name is counted as `other`, so the rule could
        never fire."""
        names = [n for value in re.findall(r'\bevent\s*=~?\s*"([^"]*)"', selector) for n in value.split("|")]
        if not names:
            return "no data, and no event matcher to check"
        unknown = sorted(set(names) - EVENTS)
        if unknown:
            return f"event names Nissa does not keep as labels (they count as 'other'): {unknown}"
        relaxed = re.sub(r',?\s*\bevent\s*=~?\s*"[^"]*"', "", selector).replace("{,", "{")
        return self._data_problem(relaxed)

    def _data_problem(self, expr: str) -> str | None:
        result = self.fleet.query(expr)
        if result.get("status") != "success":
            return f"does not evaluate: {result.get('errorType')}: {result.get('error')}"
        if not has_finite_sample(result):
            return f"no finite sample: {result['data']['result']}"[:300]
        return None

    def evaluate(self) -> dict[str, str]:
        out = {}
        for q in PANELS:
            if problem := self.panel_problem(q):
                out[q.where] = problem
        for rule in RULES:
            if problem := self.rule_problem(rule):
                out[str(rule["alert"])] = problem
        return out


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    run = _fleet.run_fleet(tmp_path_factory.mktemp("fleet"))
    fleet = next(run)
    try:
        state = Live(fleet)
        t0 = time.monotonic()
        while True:
            state.problems = state.evaluate()
            if not state.problems or time.monotonic() - t0 > WAIT_S:
                break
            time.sleep(2.0)
        state.waited_s = time.monotonic() - t0
        yield state
    finally:
        run.close()


@pytest.mark.parametrize("query", PANELS, ids=[q.where for q in PANELS])
def test_dashboard_query_returns_data(live: Live, query: d.PanelQuery) -> None:
    problem = live.problems.get(query.where)
    assert problem is None, f"{query.where}: {problem}\n  expr: {query.expr}"


@pytest.mark.parametrize("rule", RULES, ids=[str(r["alert"]) for r in RULES])
def test_alert_rule_watches_real_series(live: Live, rule: dict[str, object]) -> None:
    problem = live.problems.get(str(rule["alert"]))
    assert problem is None, f"{rule['alert']}: {problem}\n  expr: {rule['expr']}"


def test_every_target_is_scraped(live: Live) -> None:
    targets = live.fleet.api("/api/v1/targets")["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == set(d.prometheus_jobs()), jobs
    down = [(t["labels"]["job"], t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
    assert down == []


def test_the_injected_emergency_fires_its_alert(live: Live) -> None:
    """The NaN step rolled back and raised the trainer to ELEVATED: the rule without `for` fires."""
    assert has_finite_sample(live.fleet.query('sum(tolaria_rollback_total{tier="fast"}) >= 1'))
    query = 'ALERTS{alertname="EsperEmergencyElevated", alertstate="firing"}'
    deadline = time.monotonic() + 10.0  # the rule is evaluated every second; a liveness bound
    while not has_finite_sample(firing := live.fleet.query(query)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert has_finite_sample(firing), firing


@pytest.mark.parametrize("service", sorted(d.ESPER_SERVICES))
def test_compose_healthcheck_command_works(live: Live, service: str) -> None:
    """The healthcheck of docker-compose.yml, run against the live process (its port swapped in),
    exits 0; against a port nothing listens on it fails."""
    svc = d.compose_model()["services"][service]
    code = svc["healthcheck"]["test"][3]
    url = d.healthcheck_url(svc)
    live_port = next(p.port for p in live.fleet.procs.values() if p.job == service)

    def run(port: int) -> int:
        patched = code.replace(url, re.sub(r":\d+/", f":{port}/", url))
        assert patched != code
        return subprocess.run([sys.executable, "-c", patched], capture_output=True, timeout=30).returncode

    assert run(live_port) == 0
    assert run(free_port()) != 0

