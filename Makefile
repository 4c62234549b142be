# The two README commands: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.medfeat-installed

.PHONY: setup demo test bench
setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch and torchvision first, from the pins, so nothing else pulls a torch build.
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medfeat demo

test: $(STAMP)
	$(VENV)/bin/ruff check medfeat tests benchmarks
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/medfeat bench --grid cpu --out bench-results
