# Both targets do all set-up on a fresh machine: create .venv and install the project if missing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: study test lint bench clean-results

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/python studies/agc_lambda.py --preset laptop $(ARGS)

test: $(STAMP)
	bash platform/ci/install-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for b in agc model_step loader study_overhead; do $(VENV)/bin/python benchmarks/$$b.py || exit 1; done
