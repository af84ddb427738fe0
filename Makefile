# fedps: `make test` and `make demo` install everything they need into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench dist clean
.PHONY: ot-env

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/fedps demo --out out/demo

bench: $(STAMP)
	$(PY) bench/messaging.py

# The wheel, a zip for --py-files and a packed virtualenv for --archives (README, "Ship it").
# `make dist DIST_ARGS=--no-env` skips the packed virtualenv (minutes, ~1 GB download).
dist: $(STAMP)
	$(PY) scripts/dist.py $(DIST_ARGS)

# The optional OT PSI library (job.params.protocol = "ot") in its own venv, .venv-ot (~1 GB; docs/operations.md, "OT PSI").
ot-env:
	scripts/ot_env.sh .venv-ot

clean:
	rm -rf out .pytest_cache .hypothesis
