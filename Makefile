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
	$(PY) benchmarks/profile_predict.py --json benchmarks/results/profile-predict.json
	$(PY) benchmarks/predict.py --json benchmarks/results/predict.json
	$(PY) benchmarks/adapt.py --json benchmarks/results/adapt.json

# documentation pictures into Resources/Screenshots/ (15-30 s on 2 CPU cores): the abdomen CT of
# ../shared/data segmented and drawn by Slicer's MRML + VTK offscreen (needs libegl1 libegl-mesa0
# libgl1-mesa-dri; skipped without the data), and the panel from the .ui by PySide6 (installed here)
.PHONY: screenshots
screenshots: $(STAMP)
	$(PY) -c "import PySide6.QtUiTools" 2>/dev/null || $(PIP) install --quiet PySide6-Essentials
	$(PY) Testing/render_screenshots.py

clean:
	rm -rf $(VENV) build *.egg-info

# The one prepared GPU run (benchmarks/device.py, DEVELOPERS.md): pack here, run there through the
# device tool (command "make device", carry [".device"], timeout_s 540), collect its files here.
.PHONY: device device-pack device-dry device-collect
device-pack: $(STAMP)
	$(PY) benchmarks/device.py pack

# on the GPU machine: its own python3 (PyTorch with CUDA); what it lacks comes from .device/
device:
	python3 benchmarks/device.py run

# here, on the CPU: every step with tiny counts, the CUDA tests skipped with their reason (3-4 minutes)
device-dry: $(STAMP)
	$(PY) benchmarks/device.py run --dry-run --out build/device-dry
	$(PY) benchmarks/device.py collect build/device-dry

device-collect: $(STAMP)
	test -n "$(FROM)" || { echo "usage: make device-collect FROM=<the reply's files_at folder>"; exit 2; }
	$(PY) benchmarks/device.py collect $(FROM)
