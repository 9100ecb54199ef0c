# Two commands for a fresh machine: `make demo` and `make test`. Every target creates .venv on
# first use and is idempotent: the venv is rebuilt only when pyproject.toml or the constraints change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU constraint keeps pip on torch's CPU wheel; a GPU cluster sets CONSTRAINTS= (see README).
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# One ninja on PATH keeps DeepSpeed's JIT cache valid (FEASIBILITY §1), offline Hugging Face.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export OMP_NUM_THREADS ?= 1
# pip installs with --no-compile: byte-compiling every module of ~200 packages (torch, ray,
# mlflow, ...) took 83 of the install's 167 s on 2 cores, and a run imports a fraction of them.
# Python then compiles what is imported, once, into .venv (Python's own atomic writes), which
# PYTHONDONTWRITEBYTECODE (set in some images) would turn into a ~10 s recompile per process.
unexport PYTHONDONTWRITEBYTECODE

# lmms-eval without its declared dependencies (pyproject.toml's `eval` extra says why).
LMMS_EVAL := lmms-eval==0.7.3

.PHONY: setup demo test test-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q --no-compile $(PIP_C) -e '.[test,eval]'
	$(BIN)/python -m pip install -q --no-compile --no-deps $(PIP_C) $(LMMS_EVAL)
	touch $@

demo: setup
	$(BIN)/lladav demo

# Three workers on two cores: most of a test's time is Ray, servers and subprocesses starting
# or waiting, not CPU; each worker has its own Ray cluster, moto and MLflow servers. loadgroup
# (with no group marks under pytest 9: one test per work unit) hands out the first units one
# per worker, in collection order (tests/conftest.py puts the longest first).
# mypy first (its settings are in pyproject.toml): seconds once .mypy_cache is warm.
test: setup
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --durations=15

test-quick: setup
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .lladav build *.egg-info
