# The newcomer's two commands: `make test` and `make run`. Everything else is set-up they call.
# PYTHON: the interpreter .venv is built on (3.11 to 3.13). What the suite and the runbook spend is
# mostly Python's own CPU, and how the interpreter was built moves it: Debian's /usr/bin/python3 (PGO
# and LTO, the interpreter linked into the executable) spends ~19% less than pyenv's default build (a
# shared libpython, no --enable-optimizations). `.ci/run` builds on /usr/bin/python3 where it is one
# (README, Performance). A PYTHON given on the command line or in the environment that is not the
# interpreter .venv was built on builds .venv again, on it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNBOOK := $(VENV)/bin/runbook
# The project installed editable with its sandbox and test extras, every distribution pinned.
STAMP := $(VENV)/.install.stamp

.PHONY: FORCE venv test test-unit test-integration run lab sandbox-up sandbox-down bench lock clean

# The venv (below), then the project's own modules compiled, so that no process compiles them again:
# with PYTHONDONTWRITEBYTECODE set (this machine's environment sets it) Python writes nothing it
# compiles, and on a fresh clone every kernel, runner, step process and stand-in compiled what it
# imported (~0.1 s of CPU each; the suite starts hundreds). compileall writes regardless and skips
# what is up to date (~0.1 s); where it cannot write (a read-only checkout), nothing else changes.
venv: $(STAMP)
	-@$(PY) -m compileall -q runbook_lib runbook_sandbox flows tests bench >/dev/null 2>&1

# Creates .venv when missing; an existing one (say, built from the former requirements.txt) is
# upgraded in place to the pins whenever pyproject.toml or constraints.txt changes, and built again
# when PYTHON, given, is another interpreter than the one in its pyvenv.cfg.
ifneq ($(filter command line environment,$(origin PYTHON)),)
VENV_BUILT_ON := $(shell sed -n 's/^executable *= *//p' $(VENV)/pyvenv.cfg 2>/dev/null)
PYTHON_WANTED := $(shell $(PYTHON) -c 'import ensurepip, os, sys; sys.version_info >= (3, 11) and print(os.path.realpath(sys.executable))' 2>/dev/null)
ifeq ($(PYTHON_WANTED),)
$(error PYTHON=$(PYTHON): not a Python 3.11 or newer with venv's ensurepip (Debian: apt-get install python3-venv))
endif
VENV_REBUILD := $(if $(VENV_BUILT_ON),$(filter-out $(PYTHON_WANTED),$(realpath $(VENV_BUILT_ON))))
endif
$(STAMP): pyproject.toml constraints.txt $(if $(VENV_REBUILD),FORCE)
	$(if $(VENV_REBUILD),rm -rf $(VENV))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[sandbox,test]'
	rm -f $(VENV)/.requirements.stamp
	touch $(STAMP)

# The whole suite (unit and integration), as CI runs it: on two pytest-xdist workers, each a session of
# its own with its own shared sandbox; each test module runs whole on one worker (tests/conftest.py).
# `make test PYTEST_WORKERS=` runs it in one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup
test: venv
	$(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The fast tests that need no sandbox.
test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The tests against the sandbox (one shared sandbox per session, in a temporary directory).
test-integration: venv
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# The whole runbook against the sandbox; the sandbox is brought down whatever the outcome.
run: venv
	$(RUNBOOK) sandbox up
	status=0; $(RUNBOOK) run --profile sandbox --confirm $(RUN_ARGS) || status=$$?; \
	$(RUNBOOK) sandbox down; exit $$status

# JupyterLab on the notebooks over the sandbox: kernels are this venv's Python (they import runbook_lib)
# and see the sandbox profile (<sandbox dir>/sandbox.env; RUNBOOK_SANDBOX_DIR moves it). JupyterLab
# prints its URL with the token. jupyter/jupyter_server_config.py saves notebooks without their outputs
# (records go to outputs/). One Ctrl-C stops it and its kernels; the sandbox stays up with its
# state (`make sandbox-down` stops it). LAB_ARGS adds JupyterLab options, e.g. LAB_ARGS=--no-browser.
lab: venv
	$(RUNBOOK) sandbox up
	env -u RUNBOOK_HEADLESS RUNBOOK_PROFILE=sandbox $(VENV)/bin/jupyter lab --config jupyter/jupyter_server_config.py --ServerApp.answer_yes=True \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/

sandbox-up: venv
	$(RUNBOOK) sandbox up

sandbox-down: venv
	$(RUNBOOK) sandbox down

# Every benchmark (bench/), then one table of their figures (bench/report.py). The lifecycle and the
# orchestrator benchmarks start sandboxes of their own; the others share one sandbox, brought down after.
bench: venv
	$(PY) bench/sandbox_lifecycle.py
	$(PY) bench/orchestrator_throughput.py
	$(RUNBOOK) sandbox up
	status=0; for b in runbook e2e_latency deploy_overhead health_check; do $(PY) bench/$$b.py || status=$$?; done; \
	$(RUNBOOK) sandbox down; $(PY) bench/report.py; exit $$status

# Re-resolve pyproject.toml's ranges from scratch in a throwaway venv and rewrite constraints.txt
# (its comment header kept). Picks the newest versions the ranges allow on PYTHON: lock on the oldest
# Python you have (CI's /usr/bin/python3, 3.11.2), since a newer one may pick releases an older 3.11
# cannot install (tests/unit/test_pins.py names them); review the diff, then `make test` (the stamp
# sees the new constraints.txt and upgrades .venv in place).
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[sandbox,test]' && \
	{ sed -n '/^#/!q;p' constraints.txt; "$$tmp/venv/bin/python" -m pip freeze --exclude-editable; } > "$$tmp/constraints.txt" && \
	mv "$$tmp/constraints.txt" constraints.txt

clean:
	-$(RUNBOOK) sandbox down
	rm -rf .sandbox .pytest_cache build dist *.egg-info

FORCE:
