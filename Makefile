# Two commands set up a fresh machine: `make test` and `make demo`. Each creates .venv when missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch first and pinned: on the CPU machines its wheel is already on disk; an unpinned torch pulls
# several GB of CUDA packages.
TORCH   ?= torch==2.13.0

.PHONY: test test-fast demo experiment install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .[dev]
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# Single-process tests only (no torchrun workers, no tool subprocesses, nothing over ~10 s).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not multiprocess and not slow" tests

demo: $(STAMP)
	PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 $(PY) tools/demo.py

experiment: $(STAMP)
	PYTHONWARNINGS=ignore OMP_NUM_THREADS=1 $(PY) tools/experiment.py

clean:
	rm -rf .venv build *.egg-info
