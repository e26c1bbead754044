# Front door. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := stt/v1/.generated
SYSDEPS := $(VENV)/.sysdeps
BUF_VERSION := 1.75.0
BUF := $(VENV)/npm/node_modules/.bin/buf
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $@

venv: $(INSTALLED) ## create .venv and install pinned dependencies

$(GENERATED): $(INSTALLED) $(wildcard protos/stt/v1/*.proto protos/stt/internal/v1/*.proto) scripts/gen_protos.sh
	bash scripts/gen_protos.sh $(BIN)/python
	touch $@

protos: $(GENERATED) ## generate the stubs: stt.v1 into stt/v1 (SDK), stt.internal.v1 into services/shared/internal

$(BUF): $(SYSDEPS)
	npm install --prefix $(VENV)/npm --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	@touch $@

buf: $(BUF) ## buf lint + buf breaking (stt.v1 against the previous commit)
	BUF=$(BUF) bash scripts/buf.sh

$(SYSDEPS): scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	@mkdir -p $(VENV) && touch $@

sysdeps: $(SYSDEPS) ## install the Debian packages the tests use (espeak-ng, sox)

setup: $(GENERATED) ## venv + protos: everything `stt` needs

run: setup ## run the whole stack embedded (gateway + transcriber + jobstore) on localhost:50051
	$(BIN)/stt up $(RUN_ARGS)

cluster: setup ## run a local multi-process cluster (see README); TRACING=1: traces to a local receiver
	$(BIN)/python -m services.cluster $(if $(TRACING),--tracing) $(CLUSTER_ARGS)

cluster-tls: setup ## the local cluster with mutual TLS on every hop (development CA in data/cluster/certs)
	$(BIN)/python -m services.cluster --tls $(CLUSTER_ARGS)

CERTS_DIR ?= certs
certs: setup ## make a development CA and service/client certificates in $(CERTS_DIR) (stt certs)
	$(BIN)/python -m services.certs $(CERTS_DIR)

FUZZ_EXAMPLES ?= 3000
fuzz: setup $(SYSDEPS) ## long fuzz run: mutated audio of every container and malformed fields against the API
	STT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -o timeout=0 -s $(PYTEST_ARGS)

test: setup $(SYSDEPS) $(BUF) ## run the whole test suite (unit, service, system)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup $(SYSDEPS) $(BUF) ## tests without the system tests
	$(BIN)/python -m pytest -m "not system" $(PYTEST_ARGS)

deploy-check: setup ## validate the Dockerfiles and k8s manifests statically (no Docker or cluster needed)
	$(BIN)/python -m pytest tests/test_deploy.py $(PYTEST_ARGS)

hadolint: $(INSTALLED) ## lint the Dockerfiles with hadolint
	$(BIN)/hadolint services/*/Dockerfile*

.PHONY: deploy-check hadolint

lint: setup $(BUF) ## buf lint + breaking, ruff, mypy, import contracts
	BUF=$(BUF) bash scripts/buf.sh
	$(BIN)/ruff check stt services tests bench
	$(BIN)/ruff format --check stt services tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: setup ## format the code with ruff
	$(BIN)/ruff format stt services tests bench
	$(BIN)/ruff check --fix stt services tests bench

bench: setup $(SYSDEPS) ## full benchmark run (writes bench/results/)
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: setup $(SYSDEPS) ## quick benchmark run (a few minutes)
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

clean: ## remove generated code and caches (keeps .venv)
	rm -rf stt/v1 services/shared/internal .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

distclean: clean ## also remove .venv
	rm -rf $(VENV)

.PHONY: help venv protos buf sysdeps setup run cluster cluster-tls certs fuzz test test-fast lint fmt bench bench-quick clean distclean
