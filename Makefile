# pdoflowd: the everyday commands.
#
# Every target runs in a virtual environment, .venv, made with $(PYTHON) and
# holding pdoflowd (editable) with its pinned development tools (the dev
# extra of pyproject.toml) and the web console's stack (web); it is brought up to date whenever
# pyproject.toml changes. Nothing is installed outside it.

PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# Written after a complete install, so an interrupted one is redone.
INSTALLED := $(VENV)/.installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: help install-deps demo demo-web test test-slow lint clean deb systemd-test \
	bench bench-peers

help:
	@echo "make demo          start a throwaway PostgreSQL and pdoflowd, run a posting"
	@echo "make demo-web      the demo, then keep it and its web console up"
	@echo "make test          the test suite (pytest), but for its slowest tests"
	@echo "make test-slow     the slowest tests: chaos, partitions, failover, ..."
	@echo "make lint          ruff, mypy --strict, import contracts (lint-imports)"
	@echo "make bench         every performance target, against PostgreSQL's limit and peers"
	@echo "make bench-peers   pdoflowd's drain against PgQueuer's and procrastinate's"
	@echo "make deb           build the Debian package into dist/"
	@echo "make systemd-test  the package under a real systemd (root, systemd-nspawn)"
	@echo "make install-deps  create or refresh $(VENV) (the other targets do it too)"
	@echo "make clean         remove $(VENV), .bench-peers, caches and build output"

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --editable '.[dev,binary,web]'
	touch $@

install-deps: $(INSTALLED)

demo: $(INSTALLED)
	$(VENV_PYTHON) -m devtools.demo

# The demo, then its daemon and web console stay up (with a paused posting
# to resume from the console) until Ctrl-C.
demo-web: $(INSTALLED)
	$(VENV_PYTHON) -m devtools.demo --web

# The suite but for the tests marked slow (chaos, partitions, failovers,
# schedules over many periods): those run in make test-slow, and CI runs
# both.
test: $(INSTALLED)
	$(VENV_PYTHON) -m pytest -q -m "not slow"

test-slow: $(INSTALLED)
	$(VENV_PYTHON) -m pytest -q -m slow

lint: $(INSTALLED)
	$(VENV_PYTHON) -m ruff check .
	$(VENV_PYTHON) -m ruff format --check .
	$(VENV_PYTHON) -m mypy pdoflowd devtools
	$(VENV)/bin/lint-imports

# The benchmark (minutes, not part of make test): the main table, every
# target of the performance issue against PostgreSQL's limit, then the
# peers' table (as make bench-peers); results also land as JSON in
# bench-results/. BENCH_ARGS passes options to both, e.g.
# BENCH_ARGS=--quick.
bench: $(INSTALLED)
	$(VENV_PYTHON) -m bench --out bench-results $(BENCH_ARGS)
	$(VENV_PYTHON) -m bench --peers --out bench-results $(BENCH_ARGS)

# The same drain by two peer queues, PgQueuer and procrastinate, installed
# on demand into a virtual environment of their own, .bench-peers/venv
# (never into $(VENV)).
bench-peers: $(INSTALLED)
	$(VENV_PYTHON) -m bench --peers --out bench-results $(BENCH_ARGS)

# The Debian package, built from a copy of the tree into dist/.
deb:
	packaging/build-deb.sh dist

# The package installed and driven under a real systemd in systemd-nspawn
# (as root); it builds its own .deb unless PDOFLOWD_DEB names one.
systemd-test: $(INSTALLED)
	PYTHON=$(VENV_PYTHON) tests/systemd/run.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache \
		.ruff_cache .hypothesis .bench-peers
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
