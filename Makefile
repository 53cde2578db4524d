PYTHON ?= python

.PHONY: install test bench-grad-cache demo squad-open

# CPU machines: the pinned torch is the local CPU build; GPU machines: install your CUDA torch first.
install:
	$(PYTHON) -m pip install torch==2.13.0 -e ".[test,demo,cluster,tensorboard,onnx,metrics,st]"

# two worker processes (pytest-xdist), each test file on one worker: many tests wait on the processes they start
# (torchrun, kill tests, job launchers), and the other worker uses the cores meanwhile
test:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

bench-grad-cache:
	$(PYTHON) bench/bench_grad_cache.py

# The whole pipeline on data/sample (a few minutes on 2 CPU cores); RUN=dir names the run directory.
demo:
	PYTHON=$(PYTHON) bash scripts/demo.sh $(RUN)

# BM25, untrained MiniLM, DPR-trained MiniLM and hybrid on SQuAD-open, with a reader (about 10 min on idle cores);
# ARGS="--max_train_questions 320" (see scripts/squad_open.py --help) trades time for accuracy;
# ARGS="--recipe full": all training questions, both collections, a second round on mined hard negatives and the
# full reader (about 3 hours on 2 idle cores); ARGS="--recipe full --dry_run" prints its commands.
DATA ?= ../shared/data/squad_open
squad-open:
	$(PYTHON) scripts/squad_open.py --data $(DATA) $(ARGS)
