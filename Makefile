# Quick start: `make demo` and `make test` on a fresh machine with Python 3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench clean
.PHONY: fuzz soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict

unit: $(STAMP)
	$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS)
	$(PY) -m coverage report

test: lint typecheck unit

# Long runs for when the codec or the I/O layer changes (not part of `test`).
FUZZ ?= 100
fuzz: $(STAMP)
	AIOFDPASS_FUZZ=$(FUZZ) $(PY) -m pytest -q -p no:cacheprovider tests/test_codec.py -k property

SOAK ?= 20
soak: $(STAMP)
	for i in $$(seq $(SOAK)); do \
		$(PY) -m pytest -q -x -p no:cacheprovider tests/test_cancellation.py \
			tests/test_concurrency.py tests/test_hostile.py tests/test_processes.py \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache .pytest_cache .hypothesis
