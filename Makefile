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

# The main job: train a small Titans forecaster on real ETTh1, log it to MLflow, print test metrics.
run: $(STAMP)
	$(PY) -m titans_ts.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/memory_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
