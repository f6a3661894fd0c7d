# Quick start: `make demo` and `make test` on a fresh machine with Python 3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench bench-prefork clean system-deps
.PHONY: docs docs-code package
.PHONY: fuzz soak

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade 'pip>=25.1'  # --group (PEP 735)
	$(PY) -m pip install --quiet -e . --group test --group docs --group package \
		--group bench
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/echo_service.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict

# System packages that tests/test_systemd.py uses as real peers: installed
# through apt-get only where missing (and only where apt-get may run); where
# they cannot be installed, those tests skip and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
APT_INSTALL := $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends
system-deps:
	@ldconfig -p | grep -q 'libsystemd\.so\.0 ' || ($(APT_INSTALL) libsystemd0) \
		|| echo "note: libsystemd0 could not be installed; its test in tests/test_systemd.py skips"
	@command -v systemd-socket-activate >/dev/null || ($(APT_INSTALL) systemd) \
		|| echo "note: systemd could not be installed; the socket-activation test skips"

unit: $(STAMP) system-deps
	$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest $(PYTEST_ARGS)
	$(PY) -m coverage combine --quiet  # the processes the tests started
	$(PY) -m coverage report

# The docs build is part of the test: a broken reference fails it.
test: lint typecheck unit docs

# Warnings are errors (-W), every reference must resolve (-n). Output:
# docs/_build/html/index.html. The pages' code (docs/code) is linted and
# type-checked here; tests/test_docs.py runs it.
docs: docs-code
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

docs-code: $(STAMP)
	$(VENV)/bin/ruff check docs/conf.py docs/code
	$(VENV)/bin/ruff format --check docs/conf.py docs/code
	$(VENV)/bin/mypy --strict docs/conf.py docs/code

# An sdist and a wheel in dist/ (tests/test_package.py checks that the
# wheel installs and imports in a fresh venv).
package: $(STAMP)
	$(PY) -m build --outdir dist .

# Benchmarks against the blocking stdlib loop and anyio (issue 3). QUICK=1 is
# a smoke run of well under a minute; the full run takes several minutes.
# A quick run does not overwrite the published results.
BENCH_ARGS ?= $(if $(QUICK),,--json bench/results.json --plot bench/results.png)
bench: $(STAMP)
	$(PY) -m pip install --quiet --group bench
	$(PY) bench/bench.py $(if $(QUICK),--quick) $(BENCH_ARGS)

# The prefork pool against one process and SO_REUSEPORT, measured with wrk
# (issue 14): wrk is installed with apt-get when missing. QUICK=1 is a smoke
# run that writes no files; the full run takes about 8 minutes.
PREFORK_ARGS ?= $(if $(QUICK),--quick,--json bench/prefork_results.json --plot docs/prefork_benchmarks.png)
bench-prefork: $(STAMP)
	$(PY) -m pip install --quiet --group bench
	@command -v wrk >/dev/null || { \
		echo "bench-prefork: wrk is missing: installing it with apt-get"; \
		apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) bench/prefork_wrk.py $(PREFORK_ARGS)

# Long runs for when the codec or the I/O layer changes (not part of `test`).
FUZZ ?= 100
fuzz: $(STAMP)
	AIOFDPASS_FUZZ=$(FUZZ) $(PY) -m pytest -q -p no:cacheprovider tests/test_codec.py tests/test_stream.py -k property

SOAK ?= 20
soak: $(STAMP)
	for i in $$(seq $(SOAK)); do \
		$(PY) -m pytest -q -x -p no:cacheprovider tests/test_cancellation.py \
			tests/test_concurrency.py tests/test_hostile.py tests/test_between_processes.py \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache .pytest_cache .hypothesis
