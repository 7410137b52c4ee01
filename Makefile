# tunneld developer and CI entry points.
#
#   make test                        run the whole trial suite (creates .venv first): 782 tests,
#                                    3 min 22 s to 3 min 34 s on a 2-core VM shared with other work (2026-12-08)
#   make test TESTS=tests.test_session
#   make demo                        backend + server + client on 127.0.0.1, Ctrl-C stops all
#   make bench | check-config | proto | clean
#
# The venv is built once and rebuilt when setup.cfg or pyproject.toml change.
# The editable install MUST use editable_mode=compat: it puts the project root
# on sys.path, which is how twistd finds twisted/plugins/ (a default editable
# install hides the plugins).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV ?= .venv
# The interpreter the venv is made from; tunneld needs 3.11 or newer (tomllib, typing).
PYTHON ?= python3
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
TESTS ?= tests
# TRIALJOBS=2 runs trial with -j2. Off by default: most of the suite's time is
# real processes, sockets and timeouts waited for, not CPU, and trial -jN hangs
# after its summary when zero tests are selected.
TRIALJOBS ?= 1

export GRPC_VERBOSITY ?= ERROR

.PHONY: test demo bench check-config proto clean venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "tunneld needs Python >= 3.11, but '$(PYTHON)' is $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo 'not installed')." >&2; \
	  echo "Install Python 3.11 or newer, then run: make $(MAKECMDGOALS) PYTHON=python3.11 (or python3.12, ...)" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Runs trial, then prints "N passed, N failed" as the very last line, computed
# from trial's closing "PASSED (...)" / "FAILED (...)" line:
#   passed = successes + expectedFailures
#   failed = failures + errors + unexpectedSuccesses
# Fails when anything failed, when no test ran, or when the closing line is
# missing (trial crashed).
test: $(STAMP)
	@log=$(VENV)/trial.log; rc=0; \
	if [ "$(TRIALJOBS)" -gt 1 ]; then jobs=-j$(TRIALJOBS); else jobs=; fi; \
	$(PY) -m twisted.trial --reporter=verbose $$jobs $(TESTS) 2>&1 | tee $$log || rc=$$?; \
	line=$$(grep -E '^(PASSED|FAILED)( \(.*\))?$$' $$log | tail -n 1 || true); \
	count() { local n; n=$$(sed -n "s/.*[(, ]$$1=\([0-9][0-9]*\).*/\1/p" <<<"$$line"); echo $${n:-0}; }; \
	passed=$$(( $$(count successes) + $$(count expectedFailures) )); \
	failed=$$(( $$(count failures) + $$(count errors) + $$(count unexpectedSuccesses) )); \
	skips=$$(count skips); status=0; \
	if [ -z "$$line" ]; then echo "trial printed no PASSED/FAILED line (crashed?); exit status $$rc"; status=1; \
	elif [ "$$passed" -eq 0 ] && [ "$$failed" -eq 0 ]; then echo "no test ran"; status=1; \
	elif [ "$$failed" -gt 0 ]; then status=1; \
	elif [ "$$rc" -ne 0 ]; then echo "trial exited with status $$rc"; status=1; fi; \
	[ "$$skips" -eq 0 ] || echo "skipped: $$skips"; \
	echo "$$passed passed, $$failed failed"; \
	exit $$status

demo: $(STAMP)
	@VENV=$(VENV) bash scripts/demo.sh

# Direct vs tunneld vs ssh -R, one table (bench/README.md); BENCH_ARGS=--quick for a ~3 minute smoke run.
BENCH_ARGS ?=
bench: $(STAMP)
	VENV=$(VENV) bash bench/run.sh $(BENCH_ARGS)

check-config: $(STAMP)
	$(PY) -m tunneld check etc/server.toml
	$(PY) -m tunneld check etc/client.toml

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Itunneld=proto --python_out=. --grpc_python_out=. --pyi_out=. tunneld/tunnel.proto

clean:
	rm -rf .venv .venv-ci $(VENV) .demo _trial_temp* build *.egg-info
	find . -name dropin.cache -not -path './.git/*' -delete
