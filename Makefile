# memplug: `make run` starts the daemon on its embedded defaults, `make test`
# runs every check. Both create the virtualenv (.venv) and install into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := $(shell find common daemon client proto -name '*.py' -o -name '*.pyi' -o -name 'py.typed' 2>/dev/null)
# Tests marked `container` build an image and run it with podman (minutes, and
# podman, runc and debootstrap installed): skipped here, run by .ci/run
# (`make test PYTEST_ARGS=`). Run them alone with `make pytest PYTEST_ARGS="-m container"`.
PYTEST_ARGS ?= -m "not container"
SHELL := /bin/bash

.PHONY: all run test lint typecheck pytest protos check-protos clean bench reliability install \
	uninstall

all: test

# A strict editable install: mypy can see through it (the default editable
# finder hides the namespace mapping), and it is refreshed when sources change.
$(STAMP): pyproject.toml setup.py $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=strict -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/memplugd $(ARGS)

test: lint typecheck check-protos pytest

# For using memplug rather than working on it: a virtualenv of its own in
# INSTALL_DIR with memplug and memplugd linked into BINDIR (on PATH, and on
# sudo's secure_path). A virtualenv because Debian's python refuses
# `pip install` into the system (externally-managed-environment, PEP 668).
# As a user: make install INSTALL_DIR=~/.local/share/memplug BINDIR=~/.local/bin
INSTALL_DIR ?= /opt/memplug
BINDIR ?= /usr/local/bin
install:
	$(PYTHON) -m venv $(INSTALL_DIR)
	$(INSTALL_DIR)/bin/python -m pip install --quiet --disable-pip-version-check .
	mkdir -p $(BINDIR)
	ln -sf $(abspath $(INSTALL_DIR))/bin/memplug $(abspath $(INSTALL_DIR))/bin/memplugd $(BINDIR)/
	$(BINDIR)/memplug --version

# Only what install made: the two links, and INSTALL_DIR if it holds memplugd.
uninstall:
	rm -f $(BINDIR)/memplug $(BINDIR)/memplugd
	if test -x $(INSTALL_DIR)/bin/memplugd; then rm -rf $(INSTALL_DIR); fi

# The benchmark (bench/, not installed; root for the hugetlb pool and the tmpfs; restores
# both): writes docs/bench.md. BENCH_ARGS="--quick" for a smoke run, "--sections small,rss"
# for a subset.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The hardening tests (tests/hardening, root, ~3 min) recording their figures, then
# docs/reliability.md rendered from them (build/reliability/ keeps the JSON and the
# JUnit XML). RELIABILITY_ARGS="-- -k fault" passes pytest arguments through;
# RELIABILITY_ARGS="--soak 600" runs only the 16-client load for 600 s and says whether
# the daemon's fds, threads and RSS stayed flat (not part of the default run or CI).
RELIABILITY_ARGS ?=
reliability: $(STAMP)
	$(BIN)/python -m bench.reliability $(RELIABILITY_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/lint-imports --no-cache

# mypy reads the installed link tree; report paths as they are in this checkout.
EDITABLE_TREE := build/__editable__.memplug-0.1.0-py3-none-any/memplug
typecheck: $(STAMP)
	$(BIN)/mypy -p memplug.common -p memplug.daemon -p memplug.client -p memplug.v1 2>&1 \
		| sed -e 's|$(EDITABLE_TREE)/v1/|proto/memplug/v1/|' -e 's|$(EDITABLE_TREE)/\([a-z]*\)/|\1/|'; \
		exit $${PIPESTATUS[0]}
	$(BIN)/mypy tests scripts bench

check-protos: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

protos: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
