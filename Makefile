# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NUMBA_CACHE_DIR := $(CURDIR)/.numba_cache
export MPLBACKEND := Agg

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The exact torch pair that lies on this machine's disk (no download, no other build).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The measured figures of the README (CHAOS data in ../shared/data/chaos_t2; peers need the `bench` extra).
bench: $(STAMP)
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/superpixel_quality.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/table2.py
	$(PY) benchmarks/scaling.py
	$(PY) cli.py preprocess --input ../shared/data/chaos_t2 --out data/chaos_slic.h5
	$(PY) benchmarks/loader.py data/chaos_slic.h5

clean:
	rm -rf $(VENV) .numba_cache data runs
