# The newcomer's two commands: `make test` and `make run`. Everything else is set-up they call.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: venv test run lab sandbox-up sandbox-down bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

run: venv
	$(PY) -m runbook_sandbox.demo

lab: venv
	$(PY) -m runbook_lib sandbox up
	$(VENV)/bin/jupyter lab notebooks/

sandbox-up: venv
	$(PY) -m runbook_lib sandbox up

sandbox-down: venv
	$(PY) -m runbook_lib sandbox down

bench: venv
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	-$(PY) -m runbook_lib sandbox down
	rm -rf .sandbox .pytest_cache
