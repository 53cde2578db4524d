PYTHON ?= python

.PHONY: install test bench-grad-cache

# CPU machines: the pinned torch is the local CPU build; GPU machines: install your CUDA torch first.
install:
	$(PYTHON) -m pip install torch==2.13.0 -e ".[test,minilm]"

test:
	$(PYTHON) -m pytest -q tests

bench-grad-cache:
	$(PYTHON) bench/bench_grad_cache.py
