# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# Serve config/lmshard.toml (4 shards under ./var) in the foreground; Ctrl-C stops it.
run: $(STAMP)
	$(PY) -m lmshard.cli supervisord-conf -c config/lmshard.toml
	exec $(PY) -m lmshard.cli up --foreground -c config/lmshard.toml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/embedded.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var build *.egg-info client/*.egg-info
