# Every target installs what it needs into .venv, idempotently (a stamp tracks pyproject.toml).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools e2e-tools demo test e2e e2e-kind lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned, so nothing resolves a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,operator]"
	touch $(STAMP)

install: $(STAMP)

# promtool checks the metrics exposition; later a real Prometheus scrapes agents in the e2e tests.
tools:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# The Kubernetes test bed's binaries (kube-apiserver & co. built from Debian's source package when
# neither $KUBEBUILDER_ASSETS nor PATH has them; etcd, kubectl, prometheus, helm), linked into
# ${PIPESHIFT_CACHE:-$HOME/.cache/pipeshift}/bin. Idempotent: cold 7-17 min on 2 cores, warm < 1 s.
e2e-tools:
	SUDO="$(SUDO)" bash e2e/bed/install.sh

demo: $(STAMP)
	$(VENV)/bin/pipeshift demo

test: $(STAMP) tools e2e-tools
	$(PY) -m pytest -q --durations=30 tests e2e

e2e: $(STAMP) e2e-tools
	$(PY) -m pytest -q e2e

# The pinned-pipeline scenario on kind, for machines with a Docker engine (never on CI: none there).
e2e-kind: $(STAMP)
	bash e2e/kind/run.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) bench/engine.py
	$(PY) bench/serving.py
	$(PY) bench/planner.py
	$(PY) bench/reconfig.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
