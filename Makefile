# The README's two commands: `make demo` and `make test`. Both create or reuse .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The venv is (re)installed when pyproject.toml changes.
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# pytest-randomly runs the tests in a random order and prints its seed in the header ("Using --randomly-seed=N",
# hidden by -q); rerun that order with: make test PYTEST_ARGS="-p randomly --randomly-seed=N"
PYTEST_ARGS ?=

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/mgdspr demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	RAY_AUTH_MODE=disabled $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_simulate.py
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_serve.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
