# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The exact tested versions (setup.cfg holds ranges): the same set on every machine.
LOCK := constraints.txt

.PHONY: venv test demo bench iqa clean-demo

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# BasicSR (without its declared dependencies, as for bench) for tests/test_basicsr_parity.py,
# which SSPIR_REQUIRE_BASICSR=1 turns from a skip into a failure when BasicSR is missing.
# Two pytest-xdist workers, a whole test file at a time (its module-scoped builds are made
# once): the suite is mostly single-threaded start-up (imports, subprocesses, Ray, servers),
# so a serial run leaves one core idle. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pip install -q --no-deps basicsr==1.4.2
	SSPIR_REQUIRE_BASICSR=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PY) jobs/prepare_demo.py
	$(PY) jobs/build_tiny_models.py
	$(PY) jobs/degrade.py --manifest manifests/demo.json
	$(PY) jobs/caption.py --manifest manifests/demo.json --all --actors 2
	$(PY) jobs/embed.py --manifest manifests/demo.json --all
	$(PY) jobs/latents.py --manifest manifests/demo.json --all
	$(PY) model/train.py --manifest manifests/demo.json --max-steps 30 --resume
	$(PY) jobs/degrade.py --manifest manifests/demo_heldout.json
	$(PY) jobs/export_testset.py --manifest manifests/demo_heldout.json
	$(PY) jobs/demo_heldout.py
	$(PY) jobs/report.py --build out/demo --heldout out/demo_heldout --out report

# Benchmarks compare against BasicSR's own functions; it is installed without its
# declared dependencies (they pull a second OpenCV build), see docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m pip install -q --no-deps basicsr==1.4.2
	$(PY) benchmarks/degrade.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/latents.py
	$(PY) benchmarks/train_loader.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/restore.py

# Learned metrics for model/evaluate.py (LPIPS, DISTS, NIQE, MANIQA, MUSIQ, CLIPIQA, FID):
# pyiqa without its declared dependencies (they pull a second OpenCV build); weights must
# be put in place by hand where there is no internet (docs/evaluation.md).
iqa: $(STAMP)
	$(PY) -m pip install -q addict==2.4.0 einops==0.8.2 'setuptools<82'
	$(PY) -m pip install -q --no-deps pyiqa==0.1.16 openai-clip==1.0.1

clean-demo:
	rm -rf out/demo
