# One entry point per job; each target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build comes from the local disk in seconds.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: train a small Titans (MAC) forecaster on real ETTh1 (L=96, H=96), test its best
# checkpoint, log the run to MLflow (./mlflow.db) and print the test metrics and how to open the UI.
# Data: $$TITANS_TS_DATA, else ../shared/data. One torch thread: the model's many small ops run
# slower with a thread pool on 2 (shared) cores; set OMP_NUM_THREADS to change it.
run: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} TITANS_TS_DATA=$${TITANS_TS_DATA:-../shared/data} \
		$(VENV)/bin/titans-ts fit --config configs/etth1/mac.yaml --config configs/quick.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/memory_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
