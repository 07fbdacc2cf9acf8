# One command each on a fresh machine: `make demo` (the main job) and `make test` (the tests).
PY := .venv/bin/python
PIP := .venv/bin/pip
OUT ?= demo-out
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Small models run far faster on one thread per process (thread sync dominates tiny matmuls).
export OMP_NUM_THREADS ?= 1

# The `make test` command; the canary (`make test-latest`) runs the same one. pytest-xdist runs one
# worker per core (at most 4, each on one thread); a file's tests share one worker and its fixtures.
PYTEST_ARGS := -q -m "not slow" --durations=15 -n auto --maxprocesses=4 --dist loadfile

.PHONY: setup lock demo test test-latest test-all test-unit test-integration test-acceptance bench clean

# Every package at its locked version (requirements.lock, written by `make lock`), then biaslens itself
# without dependencies; `pip check` stops a lock that misses something pyproject.toml requires.
# torch's pin is repeated in constraints.txt: a fresh machine must never pull a CUDA build.
.venv/.installed: pyproject.toml constraints.txt requirements.lock
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -r requirements.lock
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch .venv/.installed

setup: .venv/.installed

demo: .venv/.installed
	.venv/bin/biaslens demo --out $(OUT) --force

test: .venv/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# Re-freeze .venv as it is now (after e.g. `.venv/bin/pip install -U transformers` and a green
# `make test`). Deliberately not a set-up step: set-up would put the old lock's versions back first.
lock:
	@test -x $(PY) || { echo "make lock: no .venv yet; run make setup first" >&2; exit 1; }
	$(PY) scripts/lock.py

# Canary: a throwaway venv with the newest releases pyproject.toml allows, the same tests; always exits 0.
# CANARY_PYTEST_ARGS='tests/integration/test_model.py -x' narrows the run.
# (One plain command, no shell in between: a timeout's SIGTERM reaches the script, which cleans up.)
test-latest: export PYTEST_ARGS := $(PYTEST_ARGS)
test-latest:
	python3 scripts/canary.py

test-all: .venv/.installed
	$(PY) -m pytest -q

# One tier alone: tests/unit (functions and small random models), tests/integration (Hugging Face
# and TransformerLens parity, offload, FSDP), tests/acceptance (the organisms and the CLI main path).
test-unit test-integration test-acceptance: test-%: .venv/.installed
	$(PY) -m pytest $(PYTEST_ARGS) tests/$*

bench: .venv/.installed
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv $(OUT) .pytest_cache
