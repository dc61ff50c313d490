"""What the local fleet is: one `ServiceSpec` per process, and the environment each child gets.

Plain data and functions (no IO) so tests can check the fleet's wiring directly. Children are
started as `python -m esper.<name> run`: the same command the containers run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from esper.core.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    module: str
    args: tuple[str, ...] = ("run",)
    ready_key: str | None = None
    """A `/healthz` JSON key that must be non-null before the service counts as ready (e.g. Tezzeret's
    first forge pass), on top of the 200 answer."""
    job: bool = False
    """Runs to completion (the trainer): a clean exit ends it, only a crash is restarted."""

    @property
    def argv(self) -> tuple[str, ...]:
        return ("-m", self.module, *self.args)


SERVICES: dict[str, ServiceSpec] = {
    s.name: s for s in (
        ServiceSpec("oona", "esper.oona"),
        ServiceSpec("urza", "esper.urza"),
        ServiceSpec("tezzeret", "esper.tezzeret", ready_key="kernels"),
        ServiceSpec("urabrask", "esper.urabrask"),
        ServiceSpec("tamiyo", "esper.tamiyo"),
        ServiceSpec("simic", "esper.simic"),
        ServiceSpec("nissa", "esper.nissa"),
        ServiceSpec("tolaria", "esper.tolaria", job=True),
    )
}
"""Every process Weatherlight knows how to run; oona first, because it creates the consumer groups."""

TRAINER = SERVICES["tolaria"]


def resolve(names: list[str]) -> list[ServiceSpec]:
    """The specs for `names`, oona first when present; unknown names are a configuration error."""
    unknown = [n for n in names if n not in SERVICES or SERVICES[n].job]
    if unknown:
        known = ", ".join(n for n, s in SERVICES.items() if not s.job)
        raise ConfigurationError(f"unknown service(s) {unknown}; known: {known}")
    ordered = sorted(dict.fromkeys(names), key=lambda n: n != "oona")
    return [SERVICES[n] for n in ordered]


def state_paths(var_dir: Path) -> dict[str, str]:
    """Where each service keeps durable state under one root (a user's own setting wins)."""
    v = var_dir.resolve()
    return {
        "URZA_DATABASE_URL": f"sqlite:///{v}/urza/catalog.db",
        "URZA_ARTIFACT_DIR": str(v / "urza/artifacts"),
        "TAMIYO_VAR_DIR": str(v / "tamiyo"),
        "TAMIYO_POLICY_DIR": str(v / "tamiyo/policies"),
        "TOLARIA_VAR_DIR": str(v / "tolaria"),
        "SIMIC_REPLAY_PATH": str(v / "simic/replay.db"),
    }


def child_env(base: Mapping[str, str], *, redis_url: str, secret: str, var_dir: Path, metrics_port: int,
              overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: the user's (their knobs pass through), state paths unless the user set
    them, then what the supervisor owns: the bus, the secret, the child's own metrics port, JSON logs."""
    env = dict(base)
    for key, value in state_paths(var_dir).items():
        env.setdefault(key, value)
    env.update({
        "ESPER_REDIS_URL": redis_url,
        "ESPER_LEYLINE_SECRET": secret,
        "ESPER_METRICS_HOST": "127.0.0.1",
        "ESPER_METRICS_PORT": str(metrics_port),
        "ESPER_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("ESPER_INSTANCE_ID", None)  # one id per process: the default <host>-<pid>
    env.update(overrides or {})
    return env
