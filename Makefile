# Both targets do all set-up on a fresh machine: create .venv and install the project if missing.
PY ?= python3
# Test processes (pytest-xdist), each with its own local Ray; tests sharing a module-scoped set-up stay together
# and the longest other tests are handed out first (tests/conftest.py). One process leaves a core idle a third of
# the time (process and cluster start-ups, one-worker phases): 2 fill 2 cores (pytest 13m41 → 10m49 from a fresh
# clone on 2 cores, on the suite of then); 1 = sequential. Today's suite is CPU-bound with 2 (~93 % of both cores
# busy, 15m51 from a fresh clone): a third process makes it no faster.
TEST_WORKERS ?= 2
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
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for b in agc model_step loader study_overhead; do $(VENV)/bin/python benchmarks/$$b.py || exit 1; done
