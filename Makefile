# Two commands on a fresh machine: `make demo` and `make test`. Each (re)creates .venv
# idempotently: the install step reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev

.PHONY: venv demo test bench clean

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

clean:
	rm -rf demo_out .pytest_cache
