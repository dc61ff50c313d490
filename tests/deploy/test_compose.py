"""deploy/docker-compose.yml, the Dockerfile and deploy/.env.example, checked without Docker.

The compose file must validate against the official compose-spec schema after interpolation; every
Esper container's environment (image ENV < env_file < environment) must build its service's real
settings objects, and what those objects say (metrics port, paths, Redis URL, slots) must agree with
the healthchecks, the volumes, Prometheus' targets and the other services.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import SecretStr

from esper.oona.settings import OonaSettings
from esper.tolaria.host import HostNetwork
from tests.deploy import _deploy as d

SCHEMA = Path(__file__).with_name("compose-spec.json")
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
GPU_SERVICES = {"tamiyo", "tolaria", "simic"}
NON_ESPER = {"redis", "prometheus", "grafana"}
# Paths a process only reads; every other path knob must sit on a writable volume.
READ_ONLY_PATHS = {("tolaria", "artifact_dir"), ("simic", "tamiyo_var_dir")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return d.compose_model()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    svcs: dict[str, Any] = compose["services"]
    return svcs


def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(doc)]


# -- schema and interpolation ------------------------------------------------------------------------

def test_vendored_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, "see tests/deploy/SOURCES.md"


def test_schema_rejects_what_compose_rejects() -> None:
    """The validator is live: a misspelt key, a bad depends_on condition and a bad GPU list fail."""
    assert _errors({"services": {"a": {"image": "x", "healtcheck": {}}}})
    assert _errors({"services": {"a": {"image": "x", "depends_on": {"b": {"condition": "healthy"}}}}})
    assert _errors({"services": {"a": {"image": "x", "deploy": {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "count": 1}]}}}}}})  # capabilities is required


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    assert _errors(compose) == []


def test_cpu_override_validates_and_drops_only_the_gpu_reservations() -> None:
    raw = d.load_yaml(d.CPU_OVERRIDE)
    assert set(raw["services"]) == GPU_SERVICES
    assert all(svc == {"deploy": d.RESET} for svc in raw["services"].values())
    # Compose validates each file on its own too, with the tag's value (`!reset {}`) in place.
    assert _errors({"services": {name: {"deploy": {}} for name in raw["services"]}}) == []
    assert re.findall(r"deploy: !reset (\S+)", d.CPU_OVERRIDE.read_text()) == ["{}"] * len(GPU_SERVICES)
    merged = d.compose_model(cpu=True)
    assert _errors(merged) == []
    full = d.compose_model()
    for name, svc in merged["services"].items():
        assert "deploy" not in svc
        assert {k: v for k, v in full["services"][name].items() if k != "deploy"} == svc


def test_every_variable_is_documented_and_secrets_have_no_default() -> None:
    used = d.variables(d.load_yaml(d.COMPOSE_FILE))
    documented = {k.name for k in d.env_example_knobs()}
    assert set(used) - documented == set(), "variables docker-compose.yml uses but .env.example does not list"
    required = {name for name, ops in used.items() if ":?" in ops}
    assert required == set(d.FAKE_SECRETS), f"required variables {required}"
    example = d.env_example_values()
    for name in required:
        assert example.get(name) == "", f"{name} must be present and empty in .env.example (no default secret)"
    with pytest.raises(d.InterpolationError, match="REDIS_PASSWORD"):
        d.interpolate(d.load_yaml(d.COMPOSE_FILE), {**d.FAKE_SECRETS, "REDIS_PASSWORD": ""})


# -- .env.example -------------------------------------------------------------------------------------

def test_env_example_is_generated_from_the_settings(tmp_path: Path) -> None:
    """Same knobs, values and order as the generator writes today (descriptions may lag)."""
    out = subprocess.run([sys.executable, str(d.DEPLOY / "gen_env_example.py")], capture_output=True, text=True,
                         check=True, cwd=d.REPO)
    (tmp_path / "fresh").write_text(out.stdout)
    fresh = [(k.name, k.value, k.commented) for k in d.env_example_knobs(tmp_path / "fresh")]
    committed = [(k.name, k.value, k.commented) for k in d.env_example_knobs()]
    assert committed == fresh, (
        "deploy/.env.example is stale: run .venv/bin/python deploy/gen_env_example.py > deploy/.env.example")


def test_env_example_documents_every_knob_once() -> None:
    knobs = d.env_example_knobs()
    names = [k.name for k in knobs]
    assert len(names) == len(set(names)), "a knob is listed twice"
    compose_vars = set(d.variables(d.load_yaml(d.COMPOSE_FILE)))
    missing = d.canonical_env_names() - set(names)
    assert missing == set(), f"settings fields not documented in .env.example: {sorted(missing)}"
    unknown = set(names) - d.all_env_names() - compose_vars
    assert unknown == set(), f".env.example names that no settings field or compose variable reads: {unknown}"
    for k in knobs:
        assert re.search(r"\w", k.comment), f"{k.name} has no description"
        if k.name in d.all_env_names():
            assert "Default:" in k.comment, f"{k.name}: the comment must give the default"


def test_documented_defaults_are_the_real_defaults() -> None:
    """Each `# NAME=value` line shows what the process uses when NAME is unset."""
    owner: dict[str, tuple[type, str]] = {}
    for cls in d.SETTINGS_ORDER:
        for field, names in d.env_names(cls).items():
            for n in names:
                owner.setdefault(n, (cls, field))
    checked = 0
    for k in d.env_example_knobs():
        if not k.commented or not k.value or k.name not in owner:
            continue
        cls, field = owner[k.name]
        default = getattr(d.load_settings(cls, {}), field)
        documented = getattr(d.load_settings(cls, {k.name: k.value}), field)
        if isinstance(default, SecretStr):
            default, documented = default.get_secret_value(), documented.get_secret_value()
        assert documented == default, f"{k.name}={k.value} documents {documented!r}, the default is {default!r}"
        checked += 1
    assert checked > 150


# -- the Esper containers ------------------------------------------------------------------------------

def test_the_fleet_is_in_compose(services: dict[str, Any]) -> None:
    assert set(services) == set(d.ESPER_SERVICES) | NON_ESPER


@pytest.mark.parametrize("service", sorted(d.ESPER_SERVICES))
def test_container_environment_builds_the_real_settings(service: str, services: dict[str, Any]) -> None:
    svc = services[service]
    settings = d.esper_settings(service)  # raises on any invalid value from .env.example or compose
    known = d.all_env_names(d.ESPER_SERVICES[service]) | d.all_env_names((OonaSettings,))
    assert set(svc["environment"]) - known == set(), "environment keys no settings field of this process reads"
    main = settings[d.ESPER_SERVICES[service][0]]
    assert isinstance(main, OonaSettings)
    main.signing_keys()
    url = urlsplit(main.require_redis_url())
    assert (url.hostname, url.port, url.password) == ("redis", 6379, d.FAKE_SECRETS["REDIS_PASSWORD"])
    assert main.metrics_host == "0.0.0.0"
    assert main.service_name == service, "ESPER_SERVICE_NAME must not be set for the whole fleet"


@pytest.mark.parametrize("service", sorted(d.ESPER_SERVICES))
def test_healthcheck_and_prometheus_use_the_metrics_port(service: str, services: dict[str, Any]) -> None:
    svc = services[service]
    port = d.esper_settings(service)[d.ESPER_SERVICES[service][0]].metrics_port  # type: ignore[attr-defined]
    assert port > 0
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], "slim images have no curl: the check is python's urllib"
    assert d.healthcheck_url(svc) == f"http://127.0.0.1:{port}/healthz"
    assert d.prometheus_jobs()[service] == [f"{service}:{port}"]


@pytest.mark.parametrize("service", sorted(d.ESPER_SERVICES))
def test_command_is_a_real_subcommand(service: str, services: dict[str, Any]) -> None:
    command = services[service]["command"]
    assert command == ["python", "-m", f"esper.{service}", "run"]
    out = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True, text=True, timeout=60,
                         cwd=d.REPO)
    assert out.returncode == 0 and "Usage" in out.stdout, out.stderr
    target = services[service]["build"]["target"]
    assert service in d.dockerfile_stages()[f"{target}-venv"].args["ESPER_PACKAGES"].split(), (
        f"esper-{service} is not installed in the {target} image")


@pytest.mark.parametrize("service", sorted(d.ESPER_SERVICES))
def test_paths_live_on_the_service_volumes(service: str, services: dict[str, Any]) -> None:
    svc = services[service]
    volumes = d.mounts(svc)
    assert volumes or service in {"oona", "nissa"}, "stateful service without a volume"
    for cls, settings in d.esper_settings(service).items():
        for field in type(settings).model_fields:
            value = getattr(settings, field)
            if field == "database_url":
                value = Path(value.removeprefix("sqlite:///"))
            if not isinstance(value, Path):
                continue
            key = field if cls is d.ESPER_SERVICES[service][0] else f"{cls.__name__}.{field}"
            assert value.is_absolute(), f"{key}={value} depends on the working directory"
            on = [m for m in volumes if value == Path(m.target) or Path(m.target) in value.parents]
            assert on, f"{key}={value} is on no volume of {service}: {volumes}"
            if (service, key) not in READ_ONLY_PATHS:
                assert not on[-1].read_only, f"{key}={value} is on a read-only mount"
            assert not any(m.source.startswith((".", "/")) for m in on), "state belongs in named volumes"


def test_shared_state_is_one_volume(services: dict[str, Any]) -> None:
    """Urza's files: one catalogue and one artifact directory for everyone who touches them."""
    urza = d.esper_settings("urza")[d.ESPER_SERVICES["urza"][0]]
    for service in ("tezzeret", "urabrask"):
        other = d.esper_settings(service)[d.ESPER_SERVICES[service][0]]
        assert (other.database_url, other.artifact_dir) == (urza.database_url, urza.artifact_dir)  # type: ignore[attr-defined]
    # The trainer reads kernels from it (Kasmina, inside the trainer, has no path of its own).
    tolaria = d.esper_settings("tolaria")[d.ESPER_SERVICES["tolaria"][0]]
    assert tolaria.artifact_dir == urza.artifact_dir  # type: ignore[attr-defined]
    sources = {s: {m.source for m in d.mounts(services[s]) if m.target == "/var/lib/esper/urza"}
               for s in ("urza", "tezzeret", "urabrask", "tolaria")}
    assert all(v == {"urza-data"} for v in sources.values()), sources
    simic = d.esper_settings("simic")[d.ESPER_SERVICES["simic"][0]]
    tamiyo = d.esper_settings("tamiyo")[d.ESPER_SERVICES["tamiyo"][0]]
    assert simic.tamiyo_var_dir == tamiyo.var_dir  # type: ignore[attr-defined]
    tamiyo_volume = {m.source for m in d.mounts(services["tamiyo"]) if m.target == str(tamiyo.var_dir)}  # type: ignore[attr-defined]
    assert {m.source for m in d.mounts(services["simic"]) if m.target == str(simic.tamiyo_var_dir)} == tamiyo_volume  # type: ignore[attr-defined]


def test_kernels_are_compiled_for_the_trainers_slots() -> None:
    """Tezzeret must compile, and Urza store graphs, for the slot shapes the trainer's host has."""
    tolaria = d.esper_settings("tolaria")[d.ESPER_SERVICES["tolaria"][0]]
    width = tolaria.hidden_width  # type: ignore[attr-defined]
    host = HostNetwork(64, 10, hidden=(width, width))
    slots = {shape.as_key() for shape in host.slot_shapes().values()}
    tezzeret = d.esper_settings("tezzeret")[d.ESPER_SERVICES["tezzeret"][0]]
    urza = d.esper_settings("urza")[d.ESPER_SERVICES["urza"][0]]
    assert slots <= set(tezzeret.slots), f"trainer slots {slots}, TEZZERET_SLOTS {tezzeret.slots}"  # type: ignore[attr-defined]
    assert urza.seed_slot in slots  # type: ignore[attr-defined]


def test_decision_budget_is_one_number() -> None:
    tamiyo = d.esper_settings("tamiyo")[d.ESPER_SERVICES["tamiyo"][0]]
    tolaria = d.esper_settings("tolaria")[d.ESPER_SERVICES["tolaria"][0]]
    assert tamiyo.step_timeout_ms == tolaria.tamiyo_step_timeout_ms == 5.0  # type: ignore[attr-defined]


def test_gpu_reservations(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_SERVICES:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert svc["build"]["target"] == "torch", f"{name} reserves a GPU but its image has no torch"
        else:
            assert devices == [], f"{name} reserves a device"


def test_depends_on_waits_for_healthy_services(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle {' -> '.join((*path, name))}"
        if name in seen:
            return
        for dep in services[name].get("depends_on", {}):
            visit(dep, (*path, name))
        seen.add(name)

    for name in services:
        visit(name, ())
    for name in d.ESPER_SERVICES:
        assert "redis" in _closure(services, name) or name == "redis", f"{name} starts before Redis is healthy"
    assert {"urza", "tezzeret", "tamiyo", "nissa"} <= _closure(services, "tolaria")
    assert "urza" in _closure(services, "tezzeret"), "the forge needs Urza's seeded catalogue"


def _closure(services: dict[str, Any], name: str) -> set[str]:
    out: set[str] = set()
    todo = list(services[name].get("depends_on", {}))
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo.extend(services[dep].get("depends_on", {}))
    return out


def test_every_service_has_a_healthcheck_and_restarts(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc["restart"] == ("no" if name == "tolaria" else "unless-stopped"), name


def test_redis_requires_the_password_and_keeps_an_aof(services: dict[str, Any]) -> None:
    redis = services["redis"]
    cmd = redis["command"]
    password = d.FAKE_SECRETS["REDIS_PASSWORD"]
    assert cmd[cmd.index("--requirepass") + 1] == password
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["environment"]["REDISCLI_AUTH"] == password, "the healthcheck must authenticate"
    assert any(m.target == "/data" and not m.source.startswith((".", "/")) for m in d.mounts(redis))
    assert "ports" not in redis, "Redis must not be published on the host"


def test_only_grafana_and_prometheus_are_published_and_on_loopback(services: dict[str, Any]) -> None:
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"grafana", "prometheus"}
    for name, ports in published.items():
        for p in ports:
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"


def test_grafana_and_prometheus_mount_the_files_they_need(services: dict[str, Any]) -> None:
    prom = services["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert d.Mount("./prometheus", "/etc/prometheus", True) in d.mounts(prom)
    graf = services["grafana"]
    graf_mounts = {m.target: m for m in d.mounts(graf)}
    assert graf_mounts["/etc/grafana/provisioning"].source == "./grafana/provisioning"
    home = Path(graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    dash_mount = graf_mounts[str(home.parent)]
    assert (d.DEPLOY / dash_mount.source / home.name).is_file()
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == d.FAKE_SECRETS["GRAFANA_ADMIN_PASSWORD"]


# -- Dockerfile ------------------------------------------------------------------------------------------

def _esper_deps(package: str) -> set[str]:
    path = d.REPO / ("libs" if (d.REPO / "libs" / package).is_dir() else "services") / package / "pyproject.toml"
    deps = tomllib.loads(path.read_text())["project"]["dependencies"]
    return {re.split(r"[ <>=;\[]", x)[0] for x in deps}


def test_dockerfile_targets_exist_and_run_as_non_root(services: dict[str, Any]) -> None:
    stages = d.dockerfile_stages()
    for name, svc in services.items():
        if "build" not in svc:
            continue
        assert svc["build"]["context"] == ".." and svc["build"]["dockerfile"] == "deploy/Dockerfile"
        target = svc["build"]["target"]
        assert target in stages, f"{name}: no stage {target}"
        assert stages[target].user not in (None, "root", "0", "0:0"), f"{target} runs as root"
    assert (d.DEPLOY / "Dockerfile.dockerignore").is_file()


@pytest.mark.parametrize("target", ["cpu-slim", "torch"])
def test_image_package_lists_are_closed_and_minimal(target: str, services: dict[str, Any]) -> None:
    packages = set(d.dockerfile_stages()[f"{target}-venv"].args["ESPER_PACKAGES"].split())
    for p in packages:
        # The Dockerfile installs /wheels/esper_<p>-*.whl: the distribution must be named esper-<p>.
        where = d.REPO / ("libs" if (d.REPO / "libs" / p).is_dir() else "services") / p / "pyproject.toml"
        assert tomllib.loads(where.read_text())["project"]["name"] == f"esper-{p}", where
        deps = {x.removeprefix("esper-") for x in _esper_deps(p) if x.startswith("esper-")}
        assert deps <= packages, f"{target}: esper-{p} needs {deps - packages}"
        if target == "cpu-slim":
            third_party = _esper_deps(p)
            assert not third_party & {"torch", "torch_geometric", "numpy", "scikit-learn"}, f"esper-{p} pulls torch"
    users = {name for name, svc in services.items() if svc.get("build", {}).get("target") == target}
    needed = set(users)
    for u in users:
        needed |= {x.removeprefix("esper-") for x in _esper_deps(u) if x.startswith("esper-")}
    closure = set(needed)
    while True:
        more = {x.removeprefix("esper-") for p in closure for x in _esper_deps(p) if x.startswith("esper-")}
        if more <= closure:
            break
        closure |= more
    assert packages == closure, f"{target} installs {packages - closure} that none of {users} needs"


def test_prometheus_scrapes_every_process_and_only_those() -> None:
    jobs = d.prometheus_jobs()
    assert set(jobs) == set(d.ESPER_SERVICES) | {"prometheus"}
    assert jobs["prometheus"] == ["localhost:9090"]
    config = yaml.safe_load(d.PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_provisioning_points_at_the_compose_prometheus(services: dict[str, Any]) -> None:
    ds = yaml.safe_load((d.GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus"
    url = urlsplit(ds[0]["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert f"0.0.0.0:{url.port}" in " ".join(services["prometheus"]["command"])
    providers = yaml.safe_load((d.GRAFANA / "provisioning/dashboards/esper.yml").read_text())["providers"]
    mount = {m.target: m.source for m in d.mounts(services["grafana"])}
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/dashboards/esper"]
    assert mount["/etc/grafana/dashboards/esper"] == "./grafana/dashboards"
    uid = ds[0]["uid"]
    dashes = d.dashboards()
    assert set(dashes) == {"fleet-overview.json", "decisions.json", "training-seeds.json", "bus.json"}
    assert len({x["uid"] for x in dashes.values()}) == len(dashes)
    for name, panel in d.all_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, f"{name} / {panel['title']}"
        assert panel["targets"], f"{name} / {panel['title']} has no query"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip()
