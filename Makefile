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

# The whole runbook against the sandbox; the sandbox is brought down whatever the outcome.
run: venv
	$(PY) -m runbook_lib sandbox up
	status=0; $(PY) -m runbook_lib run --profile sandbox --confirm $(RUN_ARGS) || status=$$?; \
	$(PY) -m runbook_lib sandbox down; exit $$status

# JupyterLab on the notebooks, its kernels seeing runbook_lib and the sandbox profile.
lab: venv
	$(PY) -m runbook_lib sandbox up
	PYTHONPATH=$(CURDIR) $(VENV)/bin/jupyter lab notebooks/

sandbox-up: venv
	$(PY) -m runbook_lib sandbox up

sandbox-down: venv
	$(PY) -m runbook_lib sandbox down

bench: venv
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	-$(PY) -m runbook_lib sandbox down
	rm -rf .sandbox .pytest_cache
