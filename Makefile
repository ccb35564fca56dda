# Two commands set up a fresh machine: `make test` and `make demo`. Each creates .venv when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch first and pinned: on the CPU machines its wheel is already on disk; an unpinned torch pulls
# several GB of CUDA packages.
TORCH   ?= torch==2.13.0

# The second CI lane (`make test-latest`): Python 3.12 with the newest megatron-core in setup.py's
# range, the newest transformers and Hugging Face's `kernels`, in a venv of its own.
LATEST_VENV   := .venv312
LATEST_PY     := $(LATEST_VENV)/bin/python
LATEST_STAMP  := $(LATEST_VENV)/.installed
# A working python3.12: on PATH, or a pyenv-installed 3.12 (pyenv's shim answers "command not found"
# for a version that is installed but not selected). Override with LATEST_PYTHON=/path/to/python3.12.
LATEST_PYTHON ?= $(shell for p in python3.12 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
# What lane 2 runs beyond the fast tier: the multi-process tests marked `stack` (parity, the
# conversion round trip, kill/resume, checkpoints across megatron-core versions).
LATEST_TESTS := -m "(not multiprocess and not slow) or stack"

.PHONY: test test-fast test-latest demo experiment install install-latest clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .[dev]
	touch $(STAMP)

install: $(STAMP)

$(LATEST_STAMP): setup.py
	@test -n "$(LATEST_PYTHON)" || { echo "make test-latest: error: no Python 3.12 found (neither python3.12 on PATH nor a pyenv 3.12); install one or set LATEST_PYTHON=/path/to/python3.12" >&2; exit 2; }
	test -x $(LATEST_PY) || $(LATEST_PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q $(TORCH)
	$(LATEST_PY) -m pip install -q --upgrade -e .[dev] "megatron-core>=0.16.1,<0.20" transformers kernels
	touch $(LATEST_STAMP)

install-latest: $(LATEST_STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# Single-process tests only (no torchrun workers, no tool subprocesses, nothing over ~10 s).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not multiprocess and not slow" tests

# Lane 2: the fast tier and the `stack` tests on the newest stack; the checkpoint tests across
# versions read lane 1's venv (megatron-core 0.16.1) as the other side.
test-latest: $(STAMP) $(LATEST_STAMP)
	$(LATEST_PY) -c 'import megatron.core, transformers, kernels, sys; print("lane 2: Python", sys.version.split()[0], "megatron-core", megatron.core.__version__.split("+")[0], "transformers", transformers.__version__)'
	SARA_OTHER_STACK_PYTHON=$(CURDIR)/$(PY) $(LATEST_PY) -m pytest -q --durations=15 $(LATEST_TESTS) tests

demo: $(STAMP)
	PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 $(PY) tools/demo.py

experiment: $(STAMP)
	PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 $(PY) tools/experiment.py

clean:
	rm -rf .venv $(LATEST_VENV) build *.egg-info
