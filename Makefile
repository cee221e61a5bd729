# `make demo` and `make test` each set themselves up: a .venv made with the machine's
# python3, requirements installed once (re-installed only when a requirements file changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1
# transformers warns at import that torch (a test-only dependency) is missing: not news here.
export TRANSFORMERS_VERBOSITY := error

.PHONY: demo test test-fast bench clean

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
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The edit-test loop: every module of calm_jax in a few minutes, without the tests marked slow
# (the key-value study, the command lines end to end, the big compiles; tests/conftest.py).
test-fast: $(VENV)/.test-deps
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

bench: $(VENV)/.test-deps
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

# One H100/H200, with the machine's own python3 and its jax (no venv is made): train-step MFU,
# memory and decode speed at ~1B scale, under 8 minutes; JSON lines also go to
# benchmarks/results/gpu_check.jsonl. Extra flags: make bench-gpu GPU_CHECK_ARGS="--tiny".
GPU_PYTHON ?= python3
.PHONY: bench-gpu
bench-gpu:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
