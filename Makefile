# The two README commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.medfeat-installed
PARITY_STAMP := $(VENV)/.medfeat-parity-installed

.PHONY: setup demo test parity bench
setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch and torchvision first, from the pins, so nothing else pulls a torch build.
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The parity suite's upstream packages (setup.py extra "parity"), into the same venv, after
# torch (the pins keep it): unigradicon pulls ITK (~1.5 GB).
$(PARITY_STAMP): $(STAMP) setup.py constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[test,parity]'
	touch $(PARITY_STAMP)

demo: $(STAMP)
	$(VENV)/bin/medfeat demo

# Static checks (ruff, mypy with mypy.ini), then every test, the parity suite (tests/parity,
# marker "parity") included.
test: $(PARITY_STAMP)
	$(VENV)/bin/ruff check medfeat tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests

# Only the parity suite: every registry family against its upstream implementation.
parity: $(PARITY_STAMP)
	$(PY) -m pytest -q -m parity tests

bench: $(STAMP)
	$(VENV)/bin/medfeat bench --grid cpu --out bench-results
