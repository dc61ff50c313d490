# Esper developer entry points. Every target that needs the venv builds it first, so a fresh
# clone needs no other step: `make test`, `make e2e`, `make bench`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Pin torch where a local wheel exists (CI: TORCH_SPEC=torch==2.13.0); empty lets pip pick the
# normal wheel for this machine when it installs esper-tamiyo's dependencies.
TORCH_SPEC ?=
PACKAGES := libs/leyline libs/core services/oona services/karn services/urza services/tezzeret services/urabrask services/kasmina services/tamiyo services/tolaria services/simic services/nissa services/weatherlight
STAMP := $(VENV)/.esper-setup
PYTEST_FLAGS ?=

.PHONY: setup demo experiment up down env-example test e2e bench bench-oona bench-tamiyo bench-blueprints bench-tolaria lint guard proto proto-check clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet $(foreach p,$(PACKAGES),-e $(p)) -r requirements-dev.txt
	touch $(STAMP)

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
test: $(STAMP) guard
	$(PY) -m pytest tests $(PYTEST_FLAGS)

# The whole fleet on an embedded Redis: train DEMO_EPOCHS, print the summary, stop cleanly.
# A laptop CPU cannot answer within the production 5 ms pipelined budget (the trainer would go
# conservative after three timeouts and train on alone), so the demo asks Tamiyo at every step with
# a budget a CPU meets; `make demo DEMO_ENV=` runs the production defaults instead.
DEMO_EPOCHS ?= 12
DEMO_ENV ?= TOLARIA_DECISION_MODE=sync TAMIYO_STEP_TIMEOUT_MS=100
demo: $(STAMP)
	$(DEMO_ENV) $(VENV)/bin/esper up --epochs $(DEMO_EPOCHS) --summary-json var/demo-summary.json

# Static host vs rule-based Tamiyo vs the GNN after Simic training (docs/simic.md); a few minutes.
experiment: $(STAMP)
	$(VENV)/bin/esper experiment --json bench/results/experiment.json --png bench/results/experiment.png

# The container stack (docs/deploy.md): needs Docker with compose and deploy/.env.
up:
	docker compose -f deploy/docker-compose.yml --env-file deploy/.env up --build -d

down:
	docker compose -f deploy/docker-compose.yml --env-file deploy/.env down

# deploy/.env.example is generated from the settings classes (a test fails when it drifts).
env-example: $(STAMP)
	$(PY) deploy/gen_env_example.py > deploy/.env.example

# Every drill (each service's own, then the fleet drills), a PASS/FAIL table, exit 1 on any FAIL.
e2e: $(STAMP)
	$(VENV)/bin/esper drill all

bench: bench-oona bench-tamiyo bench-blueprints bench-tolaria

bench-oona: $(STAMP)
	$(PY) bench/oona_bench.py --out bench/results/oona.json

bench-tamiyo: $(STAMP)
	$(PY) bench/tamiyo_bench.py --out bench/results/tamiyo.json

bench-blueprints: $(STAMP)
	$(PY) bench/blueprints_bench.py --out bench/results/blueprints.json

bench-tolaria: $(STAMP)
	$(PY) bench/tolaria_bench.py --out bench/results/tolaria.json

lint: $(STAMP) guard
	$(VENV)/bin/ruff check libs services tests bench scripts deploy
	$(VENV)/bin/mypy

guard: $(STAMP)
	$(PY) scripts/check_shared_types.py libs services

proto: $(STAMP)
	$(PY) scripts/gen_proto.py --out libs/leyline/src/esper/leyline/_generated

proto-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check libs/leyline/src/esper/leyline/_generated

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
