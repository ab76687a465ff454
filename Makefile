# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install sysdeps lint typecheck check test stress demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The second SIP binding (voicepool[sip-tls]) for the SIP-over-TLS tests, kept out of the
	# venv's site-packages: its package `pjsua2` would shadow pjsua2-pybind11's module there.
	# Those tests run it in a subprocess with this folder on PYTHONPATH.
	$(BIN)/python -m pip install -q --upgrade --target $(VENV)/sip-tls 'pjsua2-python>=2.15.1'
	touch $(STAMP)

install: $(STAMP)

sysdeps:
	bash scripts/install-system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy voicepool adapters tools tests

# Branch coverage is measured (and gated) on the engine: the part every call goes through.
ENGINE_COV := --cov=voicepool.pool --cov=voicepool._engine --cov=voicepool.lease \
	--cov=voicepool.adapter --cov=voicepool.pool_settings --cov-branch \
	--cov-report=term:skip-covered --cov-fail-under=95

# The edit loop: lint, format, types and the fast tests (pure engine core, settings, units, docs),
# no apt and no real peers; under a minute. `make test` stays the whole suite.
FAST_TESTS := tests/engine tests/settings/test_settings.py tests/settings/test_bad_values.py \
	tests/cli/test_units.py \
	tests/cli/test_docs.py tests/testing/test_sip_registrar.py

check: lint typecheck
	$(BIN)/pytest -q -x $(FAST_TESTS)

# --reruns 1: a test that fails once and passes on its rerun is reported as R (named by -rR)
# (timing under a loaded 2-core CI machine, a transport collected late); a known debt, listed in
# the closing notes, not a licence: a test that fails twice fails the run.
test: install sysdeps lint typecheck
	$(BIN)/pytest -q -rR --durations=10 --reruns 1 $(ENGINE_COV)

# The cancellation and state-machine suites N times in a row, stopping at the first failure.
N ?= 20
stress: install
	bash scripts/stress-engine.sh $(N)

demo: install
	$(BIN)/voicepool demo

bench: install
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/acquire.py

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
