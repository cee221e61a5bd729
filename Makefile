# `make demo` and `make test` each set themselves up: a .venv made with the machine's
# python3, requirements installed once (re-installed only when a requirements file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1
# transformers warns at import that torch (a test-only dependency) is missing: not news here.
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.deps: requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements-test.txt requirements.txt $(VENV)/.deps
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.deps
	$(PY) -m train.kv_arithmetic

test: $(VENV)/.test-deps
	$(PY) -m pytest -q tests

bench: $(VENV)/.test-deps
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
