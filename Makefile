# cfnode: `make demo` and `make test` work on a fresh machine (they create .venv on first use).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
DEMO_ARGS ?= --stages 4 --steps 300
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cfnode demo $(DEMO_ARGS)

# The tests start dozens of cfnode processes; with PYTHONDONTWRITEBYTECODE set (as on CI) each would compile
# cfnode's sources again (~0.3 s of CPU a process): compile them once.
test: $(STAMP)
	$(PY) -m compileall -q cfnode
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m compileall -q cfnode
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check cfnode tests bench scripts

clean:
	rm -rf $(VENV) build *.egg-info
