# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) jobs/prepare_demo.py
	$(PY) jobs/build_tiny_models.py
	$(PY) jobs/degrade.py --manifest manifests/demo.json
	$(PY) jobs/caption.py --manifest manifests/demo.json --all --actors 2
	$(PY) jobs/embed.py --manifest manifests/demo.json --all
	$(PY) model/train.py --manifest manifests/demo.json --max-steps 30 --resume

# Benchmarks compare against BasicSR's own functions; it is installed without its
# declared dependencies (they pull a second OpenCV build), see docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps basicsr==1.4.2
	$(PY) benchmarks/degrade.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/train_loader.py
	$(PY) benchmarks/train.py

clean-demo:
	rm -rf out/demo
