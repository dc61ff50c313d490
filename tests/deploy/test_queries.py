"""Static checks of every dashboard query and alert rule against the code that exports the metrics.

The live test (test_live_prometheus.py) evaluates them on a real Prometheus; these run anywhere and
catch a misspelt metric or a label value no exporter produces.
"""

from __future__ import annotations

import re
from typing import get_args

import pytest

from esper.nissa.labels import EVENTS, SOURCES
from esper.nissa.mapping import ACTIONS
from esper.nissa.metrics import EMERGENCY_LEVELS
from esper.nissa.rules import default_rules
from esper.nissa.settings import NissaSettings
from esper.tamiyo.worker import DECISION_BUCKETS_S
from esper.tolaria.rollback import RollbackTier
from tests.deploy import _deploy as d

BUILTIN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
NISSA_RULES = {r.name for r in default_rules(NissaSettings(_env_file=None))}  # type: ignore[call-arg]
# Label values a query may match, by (metric, label): the closed vocabularies the exporters use.
VOCABULARY: dict[tuple[str, str], set[str]] = {
    ("esper_telemetry_events_total", "event"): set(EVENTS),
    ("esper_telemetry_events_total", "source"): set(SOURCES),
    ("esper_decisions_total", "action"): set(ACTIONS),
    ("esper_emergency_events_total", "level"): set(EMERGENCY_LEVELS),
    ("oona_publish_total", "lane"): {"normal", "emergency"},
    ("tamiyo_decision_seconds_bucket", "le"): {f"{b:g}" for b in DECISION_BUCKETS_S},
    ("tolaria_rollback_total", "tier"): set(get_args(RollbackTier)),
    ("ALERTS", "alertstate"): {"firing", "pending"},
    ("ALERTS", "alertname"): {str(r["alert"]) for r in d.alert_rules()},
    ("esper_alert_firing", "alert"): NISSA_RULES,
    ("esper_alerts_fired_total", "alert"): NISSA_RULES,
}


def _exprs() -> list[tuple[str, str]]:
    out = [(q.where, d.as_promql(q.expr)) for q in d.panel_queries()]
    out += [(str(r["alert"]), str(r["expr"])) for r in d.alert_rules()]
    return out


EXPRS = _exprs()


def _defined_metrics() -> set[str]:
    """Every name a prometheus_client metric in the code base exposes (with its sample suffixes)."""
    exposed: set[str] = set()
    for path in [*d.REPO.glob("services/*/src/**/*.py"), *d.REPO.glob("libs/*/src/**/*.py")]:
        for kind, name in re.findall(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"',
                                     path.read_text()):
            if kind == "Counter":
                base = name.removesuffix("_total")
                exposed |= {f"{base}_total", f"{base}_created"}
            elif kind in ("Histogram", "Summary"):
                exposed |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                exposed.add(name)
    return exposed


DEFINED = _defined_metrics()


def test_the_scan_finds_the_exporters() -> None:
    assert {"oona_stream_length", "tamiyo_decision_seconds_bucket", "esper_seeds", "tolaria_rollback_total",
            "esper_telemetry_events_total", "oona_request_timeouts_total"} <= DEFINED


@pytest.mark.parametrize(("where", "expr"), EXPRS, ids=[w for w, _ in EXPRS])
def test_every_metric_is_exported_by_some_process(where: str, expr: str) -> None:
    names = d.metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    unknown = names - DEFINED - BUILTIN
    assert unknown == set(), f"{where}: no process exports {unknown}"


@pytest.mark.parametrize(("where", "expr"), EXPRS, ids=[w for w, _ in EXPRS])
def test_label_values_are_ones_the_exporters_produce(where: str, expr: str) -> None:
    for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            vocabulary = VOCABULARY.get((metric, label))
            if vocabulary is None or label == "__name__":
                continue
            if op in ("=~", "!~") and re.search(r"[.*+?()\[\]]", value):
                assert any(re.fullmatch(value, v) for v in vocabulary), f"{where}: {label}{op}{value!r} matches nothing"
                continue
            values = set(value.split("|")) if op in ("=~", "!~") else {value}
            assert values <= vocabulary, f"{where}: {metric}{{{label}{op}{value!r}}}: {values - vocabulary}"


def test_mirrored_rules_name_nissas_rules() -> None:
    mirrored = {str(r["labels"]["nissa_rule"]) for r in d.alert_rules() if "nissa_rule" in r.get("labels", {})}
    assert mirrored <= NISSA_RULES, mirrored - NISSA_RULES
    assert len(mirrored) >= 12, "the prototype's table and Nissa's fleet rules are mirrored"


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, channel) (rate(oona_request_seconds_bucket{le!="x"}[5m]))) '
            '/ on (job) group_left max by (job) ({__name__=~"a_total|b_total"}) > 0.5 and time() - c')
    assert d.metric_names(expr) == {"oona_request_seconds_bucket", "a_total", "b_total", "c"}
