"""Writes deploy/.env.example from the fleet's settings classes, so it documents every knob.

    .venv/bin/python deploy/gen_env_example.py > deploy/.env.example

Every knob of every process in docker-compose.yml appears once, in the section of the first process
that reads it, as `# NAME=<default>` under a comment with its meaning. Lines without `#` are values
this deployment sets on purpose. tests/deploy/test_compose.py fails when the committed file is not
this script's output (a knob was added, renamed or changed its default): rerun the command above.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
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

# (section title, settings class, the compose services whose processes read it). Order matters: a
# knob is documented in the first section whose class has it.
SECTIONS: list[tuple[str, type[BaseSettings], str]] = [
    ("Every process: bus, signing, logs, metrics (ESPER_*)", OonaSettings, "all"),
    ("Urza: blueprint library", UrzaSettings, "urza; the URZA_* paths also tezzeret, urabrask, tolaria"),
    ("Tezzeret: blueprint compiler", TezzeretSettings, "tezzeret"),
    ("Urabrask: crucible and BSDS sheets", UrabraskSettings, "urabrask"),
    ("Tamiyo: policy worker", TamiyoSettings, "tamiyo; TAMIYO_STEP_TIMEOUT_MS also tolaria"),
    ("Tolaria: trainer", TolariaSettings, "tolaria"),
    ("Kasmina: seed executor (inside the tolaria process)", KasminaSettings, "tolaria"),
    ("Simic: learner", SimicSettings, "simic"),
    ("Nissa: telemetry -> metrics, alerts, SLOs", NissaSettings, "nissa"),
]

# Set for each container in docker-compose.yml's `environment`, which wins over env_file.
SET_BY_COMPOSE: dict[str, str] = {
    "ESPER_REDIS_URL": "redis://:${REDIS_PASSWORD}@redis:6379/0",
    "ESPER_LEYLINE_SECRET": "from ESPER_LEYLINE_SECRET above",
    "ESPER_METRICS_HOST": "0.0.0.0, so Prometheus can scrape over the compose network",
    "ESPER_METRICS_PORT": "9101 oona, 9102 urza, 9103 tezzeret, 9104 urabrask, 9105 tamiyo, 9106 tolaria, 9107 simic",
    "NISSA_METRICS_PORT": "9100",
    "URZA_DATABASE_URL": "sqlite:////var/lib/esper/urza/catalog.db (volume urza-data)",
    "URZA_ARTIFACT_DIR": "/var/lib/esper/urza/artifacts (volume urza-data)",
    "TAMIYO_VAR_DIR": "/var/lib/esper/tamiyo (volume tamiyo-data)",
    "TAMIYO_POLICY_DIR": "/var/lib/esper/tamiyo/policies (volume tamiyo-data)",
    "TOLARIA_VAR_DIR": "/var/lib/esper/tolaria (volume tolaria-data)",
    "TOLARIA_SUMMARY_JSON": "/var/lib/esper/tolaria/summary.json (volume tolaria-data)",
    "SIMIC_REPLAY_PATH": "/var/lib/esper/simic/replay.db (volume simic-data)",
    "SIMIC_POLICY_DIR": "/var/lib/esper/simic/policies (volume simic-data)",
    "SIMIC_TAMIYO_VAR_DIR": "/var/lib/esper/tamiyo (volume tamiyo-data, read-only)",
}

# Values this deployment sets on purpose (uncommented in the file).
DEPLOY_VALUES: dict[str, tuple[str, str]] = {
    "TEZZERET_SLOTS": ('["v32"]', "compile kernels for the trainer's seed slots: v<TOLARIA_HIDDEN_WIDTH> (32)"),
    "URZA_SEED_SLOT": ("v32", "store blueprint graphs for the trainer's slot kind: v<TOLARIA_HIDDEN_WIDTH> (32)"),
}

NOTES: dict[str, str] = {
    "TAMIYO_STEP_TIMEOUT_MS": "Tolaria reads it too: the deadline of every state packet it sends (one number for "
                              "both sides of the hot path).",
}

# Defaults the images change (ENV in deploy/Dockerfile); this file still overrides them.
IMAGE_DEFAULTS: dict[str, str] = {"ESPER_LOG_FORMAT": "json"}

# Knobs no process should get from this file.
LEAVE_UNSET: dict[str, str] = {
    "ESPER_SERVICE_NAME": "each process has its own default (oona, urza, ...); setting it here renames them all",
    "ESPER_INSTANCE_ID": "defaults to <container hostname>-<pid>, unique per replica",
    "ESPER_ENABLE_FAULT_INJECTION": "drills only: allows the *_FAULT_* knobs; never in a real deployment",
    "TAMIYO_FAULT_INFERENCE_DELAY_MS": "drills only (needs ESPER_ENABLE_FAULT_INJECTION=1)",
    "TAMIYO_FAULT_CRASH_AFTER": "drills only (needs ESPER_ENABLE_FAULT_INJECTION=1)",
    "TOLARIA_FAULT_NAN_AT_STEP": "drills only (needs ESPER_ENABLE_FAULT_INJECTION=1)",
    "TOLARIA_FAULT_STEP_DELAY_MS": "drills only (needs ESPER_ENABLE_FAULT_INJECTION=1)",
    "TOLARIA_FAULT_CORRUPT_WEIGHTS_AT_STEP": "drills only (needs ESPER_ENABLE_FAULT_INJECTION=1)",
}

MISSING_DESCRIPTIONS: dict[str, str] = {
    "ESPER_SERVICE_NAME": "process name in logs, metrics, heartbeat keys and envelopes",
    "KASMINA_BREAKER_FAILURES": "kernel-fetch failures that open Kasmina's breaker",
    "KASMINA_BREAKER_SUCCESSES": "half-open successes that close it again",
    "KASMINA_BREAKER_RESET_S": "seconds the open breaker fails fast before HALF_OPEN",
}

DYNAMIC_DEFAULTS: dict[str, str] = {
    "ESPER_INSTANCE_ID": "<hostname>-<pid>",
    "TOLARIA_RUN_ID": "run-<8 random hex digits>",
}

COMPOSE_HEADER = """\
# Esper fleet configuration for deploy/docker-compose.yml.
#
#   cp deploy/.env.example deploy/.env      # deploy/.gitignore keeps .env out of git
#   docker compose -f deploy/docker-compose.yml --env-file deploy/.env up --build
#
# Generated by deploy/gen_env_example.py from the services' settings classes: every knob is listed
# once as `# NAME=<default>` under its meaning; uncomment a line to change it. Every Esper container
# reads this file (env_file); docker-compose.yml also uses the first section for its own settings.

# ================================================================================================
# Compose: secrets and ports (required values have no default: compose refuses to start without)
# ================================================================================================

# REQUIRED. Redis password (redis-server --requirepass; the services get it in ESPER_REDIS_URL). Default: none.
# Hex only, it is put in a URL: python3 -c 'import secrets; print(secrets.token_hex(32))'
REDIS_PASSWORD=

# REQUIRED. HMAC-SHA256 key every envelope is signed with; read by every process. Default: none.
# python3 -c 'import secrets; print(secrets.token_hex(32))'
ESPER_LEYLINE_SECRET=

# REQUIRED. Grafana admin password (login at http://127.0.0.1:${GRAFANA_PORT}). Default: none.
GRAFANA_ADMIN_PASSWORD=

# Grafana admin user. Default: admin.
# GRAFANA_ADMIN_USER=admin

# Host port of Grafana, published on 127.0.0.1 only. Default: 3000.
# GRAFANA_PORT=3000

# Host port of Prometheus, published on 127.0.0.1 only. Default: 9090.
# PROMETHEUS_PORT=9090

# How long Prometheus keeps samples. Default: 15d.
# PROMETHEUS_RETENTION=15d

# Tag of the images compose builds (esper/cpu-slim, esper/torch). Default: dev.
# ESPER_IMAGE_TAG=dev

# pip requirement for torch in the torch image. Default: torch (PyPI: the CUDA build on linux/amd64).
# TORCH_SPEC=torch

# Index to install torch from; https://download.pytorch.org/whl/cpu for a CPU-only image. Default: PyPI.
# TORCH_INDEX_URL=
"""


def env_names(name: str, field: FieldInfo, prefix: str) -> list[str]:
    """The environment variable names a field reads, canonical first (what pydantic-settings matches,
    minus lower-case aliases that are field names for constructor use)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str) and c == c.upper()]
    if isinstance(alias, str):
        return [alias]
    return [f"{prefix}{name}".upper()]


def render_default(value: Any) -> str:
    if value is None or value is PydanticUndefined:
        return ""
    if isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def knobs(cls: type[BaseSettings]) -> Iterator[tuple[list[str], FieldInfo]]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    for name, field in cls.model_fields.items():
        yield env_names(name, field, prefix), field


def sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def render() -> str:
    out = [COMPOSE_HEADER]
    done = {"ESPER_LEYLINE_SECRET"}  # documented in the compose section (it is both)
    for title, cls, readers in SECTIONS:
        lines: list[str] = []
        for names, field in knobs(cls):
            canonical = names[0]
            if canonical in done:
                continue
            done.add(canonical)
            desc = field.description or MISSING_DESCRIPTIONS.get(canonical)
            if not desc:
                raise SystemExit(f"{cls.__name__}: {canonical} has no description")
            text = sentence(desc)
            if len(names) > 1:
                text += f" Also accepted: {', '.join(names[1:])}."
            if canonical in DYNAMIC_DEFAULTS:
                default = ""
                text += f" Default: {DYNAMIC_DEFAULTS[canonical]}."
            else:
                default = render_default(field.default)
                text += f" Default: {default or 'unset'}."
            lines.append(f"# {text}")
            if canonical in NOTES:
                lines.append(f"# {NOTES[canonical]}")
            if canonical in IMAGE_DEFAULTS:
                lines.append(f"# The images set {canonical}={IMAGE_DEFAULTS[canonical]} (deploy/Dockerfile).")
            if canonical in SET_BY_COMPOSE:
                lines.append(f"# Set by docker-compose.yml for each container ({SET_BY_COMPOSE[canonical]}); "
                             "a value here has no effect.")
            if canonical in LEAVE_UNSET:
                lines.append(f"# Leave unset: {LEAVE_UNSET[canonical]}.")
            if canonical in DEPLOY_VALUES:
                value, why = DEPLOY_VALUES[canonical]
                lines.append(f"# This deployment: {why}.")
                lines.append(f"{canonical}={value}")
            else:
                lines.append(f"# {canonical}={default}")
            lines.append("")
        bar = "# " + "=" * 96
        out.append(f"{bar}\n# {title}\n# Read by: {readers}\n{bar}\n")
        out.append("\n".join(lines))
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

