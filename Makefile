# ctdistill: every target creates .venv and installs the pinned environment on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ctdistill-installed
DEMO_OUT ?= demo_out
# pytest-xdist workers; each worker and its bundle subprocesses use one intra-op thread (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

lint: $(STAMP)
	$(PY) -m ruff check pipelines transforms networks distill tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
