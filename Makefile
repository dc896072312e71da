# `make demo` and `make test` bootstrap .venv on first use (Python 3.11+ and the package index are all they need).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
DEMO_CONFIG ?= configs/clip.py:tiny

.PHONY: demo test bench install clean

# The demo needs only vlp's own dependencies; the tests add pytest and the interop extra (torch, transformers,
# open_clip: several GB with torch's CUDA libraries), so only `make test` installs them.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test,interop]'
	touch $@ $(VENV)/.installed-core

install: $(VENV)/.installed

demo: $(VENV)/.installed-core
	$(PY) -m vlp.train --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # 2 workers, each test file on one (its fixtures shared)

bench: $(VENV)/.installed  # open_clip_step.py compares with open_clip + torch (the interop extra)
	$(PY) benchmarks/train_step.py --matmul_floor
	$(PY) benchmarks/open_clip_step.py
	$(PY) benchmarks/xla_cpu_threads.py
	$(PY) benchmarks/xla_cpu_layouts.py
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/compile.py --config=configs/clip.py:tiny --policies=none,full
	$(PY) benchmarks/decode.py --config=configs/coca.py:tiny
	$(PY) benchmarks/mlcd.py --kmeans_n=50000
	$(PY) benchmarks/train_step.py --config=configs/albef.py:tiny

clean:
	rm -rf $(VENV) runs
