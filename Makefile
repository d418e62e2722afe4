# Every target creates (or reuses) a local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv sysdeps test lint demo bench bench-peers bench-tasks clean bytecode

venv: $(STAMP)

# meshscale's own modules compiled ahead, as `pip install` of a wheel leaves them (an
# editable install does not; with PYTHONDONTWRITEBYTECODE set, as on some CI hosts,
# every node and worker process would compile them again at each start: about 0.45 s of
# CPU and 1 MB of resident memory an agent, issue 19). Only changed files are compiled;
# a stale file is never used (Python checks each source's mtime and size).
bytecode: venv
	@$(BIN)/python -m compileall -q -j 0 src

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo,plan,batch]'
	@touch $(STAMP)

lint: venv
	$(BIN)/ruff check src tests bench $(wildcard examples)
	$(BIN)/mypy --strict src/meshscale

# Chromium for the browser test, iproute2 and nftables for the multi-host tests: installed
# when missing and root, else the tests that need them skip (scripts/system-deps).
sysdeps:
	@scripts/system-deps

# Two test processes (pytest-xdist), a test file's tests in one of them (module fixtures
# start a mesh once); TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2

test: lint sysdeps bytecode
	$(BIN)/python -m pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: venv bytecode
	$(BIN)/meshscale demo

bench: venv
	$(BIN)/python bench/membership.py --nodes 1000 --seed 1 --json bench/results/membership-1000.json

# Ray and Dask for bench/tasks.py, in a venv of their own: never in .venv, so `make test`
# does not depend on them.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

bench-peers: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml bench/requirements-peers.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e . -r bench/requirements-peers.txt
	@touch $(BENCH_STAMP)

bench-tasks: bench-peers
	$(BENCH_VENV)/bin/python bench/tasks.py $(BENCH_ARGS) --json bench/results/tasks.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
	find src -name __pycache__ -type d -prune -exec rm -rf {} +
