"""Readers for the files under deploy/, shared by the deploy tests.

Nothing here assumes the files are right: they parse compose (merge keys, `${VAR}` interpolation,
`!reset`), the Dockerfile's stages, deploy/.env.example, the Prometheus config and the Grafana
dashboards, and compute what a container would see (image ENV < env_file < environment), so the
tests can hold them against the services' real settings classes and a real Prometheus.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from esper.kasmina.settings import KasminaSettings
from esper.nissa.settings import NissaSettings
from esper.oona.settings import OonaSettings
from esper.simic.settings import SimicSettings
from esper.tamiyo.settings import TamiyoSettings
from esper.tezzeret.settings import TezzeretSettings
from esper.tolaria.settings import TolariaSettings
from esper.urabrask.settings import UrabraskSettings
from esper.urza.settings import UrzaSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
CPU_OVERRIDE = DEPLOY / "docker-compose.cpu.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / ".env.example"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"

# Compose service -> the settings classes its process reads (Kasmina runs inside the trainer).
ESPER_SERVICES: dict[str, tuple[type[BaseSettings], ...]] = {
    "oona": (OonaSettings,),
    "urza": (UrzaSettings,),
    "tezzeret": (TezzeretSettings,),
    "urabrask": (UrabraskSettings,),
    "tamiyo": (TamiyoSettings,),
    "tolaria": (TolariaSettings, KasminaSettings),
    "simic": (SimicSettings,),
    "nissa": (NissaSettings,),
}
# The order deploy/gen_env_example.py documents knobs in (a knob belongs to the first class that has it).
SETTINGS_ORDER: tuple[type[BaseSettings], ...] = (
    OonaSettings, UrzaSettings, TezzeretSettings, UrabraskSettings, TamiyoSettings, TolariaSettings, KasminaSettings,
    SimicSettings, NissaSettings)

# Values a real deploy/.env must supply (empty in .env.example: there is no default secret).
FAKE_SECRETS = {"REDIS_PASSWORD": "0123456789abcdef" * 4, "ESPER_LEYLINE_SECRET": "fedcba9876543210" * 4,
                "GRAFANA_ADMIN_PASSWORD": "not-a-real-password"}


# -- settings classes ---------------------------------------------------------------------------------

def env_names(cls: type[BaseSettings]) -> dict[str, list[str]]:
    """Field name -> the environment variables pydantic-settings reads it from, canonical first.
    Lower-case alias choices are field names for constructor use, not environment variables."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    out: dict[str, list[str]] = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            out[name] = [c for c in alias.choices if isinstance(c, str) and c == c.upper()]
        elif isinstance(alias, str):
            out[name] = [alias]
        else:
            out[name] = [f"{prefix}{name}".upper()]
    return out


def all_env_names(classes: tuple[type[BaseSettings], ...] = SETTINGS_ORDER) -> set[str]:
    return {n for cls in classes for names in env_names(cls).values() for n in names}


def canonical_env_names(classes: tuple[type[BaseSettings], ...] = SETTINGS_ORDER) -> set[str]:
    return {names[0] for cls in classes for names in env_names(cls).values()}


def load_settings(cls: type[BaseSettings], env: Mapping[str, str]) -> BaseSettings:
    """The settings object a process would build with exactly `env` as its environment."""
    with mock.patch.dict(os.environ, dict(env), clear=True):
        return cls(_env_file=None)  # type: ignore[call-arg]


# -- compose -------------------------------------------------------------------------------------------

class _Reset:
    """Compose's `!reset` tag: the key is removed from the merged result."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader that also knows `!reset`


_VAR = re.compile(r"\$(?:(\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    pass


def variables(obj: Any) -> dict[str, set[str]]:
    """Every `${VAR...}` compose interpolates -> the operators used with it ('' for none)."""
    found: dict[str, set[str]] = {}
    for text in _strings(obj):
        for m in _VAR.finditer(text):
            name = m["braced"] or m["bare"]
            if name:
                found.setdefault(name, set()).add(m["op"] or "")
    return found


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def interpolate(obj: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, ${V:+r}, $V, $$."""
    if isinstance(obj, str):
        return _VAR.sub(lambda m: _substitute(m, env), obj)
    if isinstance(obj, Mapping):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    return obj


def _substitute(m: re.Match[str], env: Mapping[str, str]) -> str:
    if m[1]:
        return "$"
    name = m["braced"] or m["bare"]
    op, arg = m["op"] or "", m["arg"] or ""
    value = env.get(name)
    unset_or_empty = not value
    if op == ":-":
        return arg if unset_or_empty else str(value)
    if op == "-":
        return arg if value is None else value
    if op in (":?", "?"):
        if (unset_or_empty if op == ":?" else value is None):
            raise InterpolationError(f"required variable {name} is missing: {arg}")
        return str(value)
    if op == ":+":
        return "" if unset_or_empty else arg
    if op == "+":
        return "" if value is None else arg
    return value or ""


def merge(base: Any, override: Any) -> Any:
    """Merge an override file into a compose model (mappings deep-merged; `!reset` removes a key)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if v is RESET:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v)
            else:
                out[k] = v
        return out
    return override


def env_example_values(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """The uncommented NAME=value lines of an env file (what compose and env_file use)."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            out[m[1]] = m[2]
    return out


@dataclass(frozen=True)
class Knob:
    name: str
    value: str
    commented: bool
    comment: str  # the comment lines right above it


def env_example_knobs(path: Path = ENV_EXAMPLE) -> list[Knob]:
    """Every `NAME=value` or `# NAME=value` line with the comment block above it."""
    knobs = []
    block: list[str] = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(# )?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            knobs.append(Knob(m[2], m[3], bool(m[1]), "\n".join(block)))
            block = []
        elif line.startswith("#"):
            block.append(line)
        else:
            block = []
    return knobs


def compose_env() -> dict[str, str]:
    """What compose interpolates the file with: deploy/.env.example, its required secrets filled in."""
    return {**env_example_values(), **FAKE_SECRETS}


@functools.cache
def compose_model(*, cpu: bool = False) -> dict[str, Any]:
    """The interpolated compose model (cached: treat it as read-only)."""
    model = load_yaml(COMPOSE_FILE)
    if cpu:
        model = merge(model, load_yaml(CPU_OVERRIDE))
    result: dict[str, Any] = interpolate(model, compose_env())
    return result


def image_env(stage: str) -> dict[str, str]:
    """ENV of a Dockerfile stage and the stages it is built FROM (KEY=VALUE form only)."""
    stages = dockerfile_stages()
    env: dict[str, str] = {}
    chain = []
    name: str | None = stage
    while name in stages:
        chain.append(name)
        name = stages[name].base
    for s in reversed(chain):
        for key, value in stages[s].env.items():
            env[key] = value
    return env


def container_env(service: str, *, cpu: bool = False) -> dict[str, str]:
    """A container's environment as Docker builds it: image ENV < env_file < environment."""
    svc = compose_model(cpu=cpu)["services"][service]
    env = image_env(svc["build"]["target"]) if "build" in svc else {}
    env_files = svc.get("env_file", [])
    for f in [env_files] if isinstance(env_files, str) else env_files:
        assert (COMPOSE_FILE.parent / f).name == ".env", f"{service}: env_file {f} is not deploy/.env"
        env.update(compose_env())  # deploy/.env is a filled-in copy of .env.example
    environment = svc.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: "" if v is None else str(v) for k, v in environment.items()})
    return env


@functools.cache
def esper_settings(service: str) -> dict[type[BaseSettings], BaseSettings]:
    env = container_env(service)
    return {cls: load_settings(cls, env) for cls in ESPER_SERVICES[service]}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(svc: Mapping[str, Any]) -> list[Mount]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append(Mount(parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append(Mount(v.get("source", ""), v["target"], bool(v.get("read_only"))))
    return out


def healthcheck_url(svc: Mapping[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    m = re.search(r"http://[^'\" ]+", text)
    assert m, f"no URL in healthcheck {test}"
    return m[0]


# -- Dockerfile ----------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str]
    env: dict[str, str]
    user: str | None
    text: str


@functools.cache
def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Stages by name, with their ARG defaults, ENV and USER (line continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m and m[2], f"unnamed stage: {line}"
            current = Stage(m[2], m[1], {}, {}, None, "")
            stages[current.name] = current
        elif current is None:
            continue
        elif word == "ARG":
            name, _, default = rest.partition("=")
            current.args[name.strip()] = default.strip().strip('"')
        elif word == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
                current.env[key] = value.strip('"')
        elif word == "USER":
            current.user = rest.strip()
        if current is not None:
            current.text += line + "\n"
    return stages


# -- Prometheus and Grafana ----------------------------------------------------------------------------

def prometheus_jobs(config: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    config = config or yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
            for job in config["scrape_configs"]}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def panel_queries() -> list[PanelQuery]:
    out = []
    for name, dash in dashboards().items():
        for panel in _panels(dash["panels"]):
            for target in panel.get("targets", []):
                out.append(PanelQuery(name, panel["title"], target["refId"], target["expr"]))
    return out


def all_panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, dash in dashboards().items():
        for panel in _panels(dash["panels"]):
            yield name, panel


# Grafana's built-in variables -> what a test query uses instead. The windows cover a whole test run
# (shorter than 5 min), so a rate or increase sees every event since the fleet started.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "5m"}


def as_promql(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


# -- PromQL, just enough to take a rule's expression apart ----------------------------------------------

_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_SET_OPERATORS = ("and", "or", "unless")


def _top_level_tokens(expr: str) -> Iterator[tuple[int, str]]:
    """(index, token) of comparison and set operators outside (), [], {} and strings."""
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for op in _COMPARISONS:
                if expr.startswith(op, i):
                    yield i, op
                    i += len(op)
                    break
            else:
                m = re.match(r"(and|or|unless)\b", expr[i:])
                if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_")):
                    yield i, m[1]
                    i += len(m[1])
                else:
                    i += 1
            continue
        i += 1


def split_set_operands(expr: str) -> list[str]:
    """`a > 1 and on (x) b` -> [`a > 1`, `on (x) b`'s vector part]."""
    parts, start = [], 0
    for i, tok in _top_level_tokens(expr):
        if tok in _SET_OPERATORS:
            parts.append(expr[start:i])
            start = i + len(tok)
    parts.append(expr[start:])
    cleaned = []
    for p in parts:
        p = p.strip()
        p = re.sub(r"^(on|ignoring)\s*\([^)]*\)\s*(group_left|group_right)?\s*(\([^)]*\))?\s*", "", p)
        cleaned.append(p.strip())
    return cleaned


def strip_comparison(expr: str) -> tuple[str, str | None]:
    """`lhs > 0.5` -> (`lhs`, `> 0.5`); an expression without a top-level comparison -> (expr, None).
    Only a comparison against a number literal is stripped."""
    comparisons = [(i, tok) for i, tok in _top_level_tokens(expr) if tok in _COMPARISONS]
    if not comparisons:
        return expr.strip(), None
    i, tok = comparisons[-1]
    rhs = expr[i + len(tok):].strip()
    rhs = re.sub(r"^bool\s+", "", rhs)
    if not re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", rhs):
        return expr.strip(), None
    return expr[:i].strip(), f"{tok} {rhs}"


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                 "bool", "inf", "nan", "le"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (plain selectors and __name__ regexes of plain alternatives)."""
    names = set()
    for alt in re.findall(r'__name__\s*=~?\s*"([^"]+)"', expr):
        names.update(alt.split("|"))
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", no_labels)
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", no_grouping):
        word = m[1]
        if word.lower() in _PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names
