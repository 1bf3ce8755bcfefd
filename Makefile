# cmvae: two commands on a fresh machine.
#   make report   set up .venv, build the default data, run the default grid, build the book (book/_build/html)
#   make test     set up .venv, build the default data, run the whole test suite
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the set-up is redone only when the pins or the package definition change
PINS_HASH := $(shell cat requirements.lock setup.py settings.ini pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(PINS_HASH)
export CMVAE_DATA ?= $(CURDIR)/data
GRID ?= parameters/default.yaml
JOBS ?= 2

.PHONY: setup data test test-fast report runs book clean-book help

help:
	@echo "make report  - set-up, data, default grid, book -> book/_build/html/index.html"
	@echo "make test    - set-up, data, pytest tests/, nbdev_test, notebook/library sync checks"

setup: $(STAMP)

$(STAMP):
	@echo "== set-up: $(VENV) with the pins of requirements.lock"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

data: setup
	$(BIN)/cmvae-data polymnist --root "$(CMVAE_DATA)"

test: data
	$(BIN)/python -m pytest -q tests/
	$(BIN)/nbdev_test --n_workers 2

runs: data
	$(BIN)/cmvae-grid $(GRID) --jobs $(JOBS)

book: setup
	$(BIN)/cmvae-report build

# the book is built even when a run failed (it lists the failures); the exit status is then the grid's
report: data
	@status=0; $(BIN)/cmvae-grid $(GRID) --jobs $(JOBS) || status=$$?; \
	$(BIN)/cmvae-report build || exit $$?; \
	echo "== report: $(CURDIR)/book/_build/html/index.html"; \
	if [ $$status -ne 0 ]; then echo "== some runs of $(GRID) failed: see above and the book's runs page"; fi; \
	exit $$status

clean-book:
	rm -rf book/_build book/_generated
