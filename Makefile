# `make test` and `make demo` work from a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q Testing

# offline, about 5 minutes on a CPU; prints the output folder at the end
demo: $(STAMP)
	$(VENV)/bin/fseft demo

benchmark: $(STAMP)
	mkdir -p benchmarks/results
	$(PY) benchmarks/predict.py --json benchmarks/results/predict.json
	$(PY) benchmarks/adapt.py --json benchmarks/results/adapt.json

clean:
	rm -rf $(VENV) build *.egg-info
