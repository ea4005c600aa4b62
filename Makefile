# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench faults soak lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# Serve config/lmshard.toml (4 shards under ./var) in the foreground; Ctrl-C stops it.
run: $(STAMP)
	$(PY) -m lmshard.ops.cli supervisord-conf -c config/lmshard.toml
	exec $(PY) -m lmshard.ops.cli up --foreground -c config/lmshard.toml

test: $(STAMP)
	$(PY) -m pytest -q

# lmshard against raw py-lmdb, zlmdb and Redis (docs/performance.md); BENCH_ARGS=--quick to try.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing and this is not root: the suite leaves Redis out" \
	         "(sudo apt-get install redis-server)"; \
	  fi; \
	fi
	$(PY) -m bench.suite $(BENCH_ARGS)

# Histories under a nemesis, checked (tests/faults); FAULTS_ARGS="--minutes 10" for longer.
faults: $(STAMP)
	$(PY) -m tests.faults $(or $(FAULTS_ARGS),--histories 3)

# A long history with periodic faults; owner RSS, fds and reader slots must stay flat.
soak: $(STAMP)
	$(PY) -m tests.faults.soak $(or $(SOAK_ARGS),--minutes 10)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var build *.egg-info client/*.egg-info
