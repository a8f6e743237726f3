# `make demo` and `make test` both install into .venv first; the install step
# is skipped when neither requirements.txt nor constraints.txt has changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install constraints demo test test-fast smoke lint clean-runs

install: $(STAMP)

# requirements.txt: lower bounds; constraints.txt: the exact versions the test suite passed with.
$(STAMP): requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt -c constraints.txt
	touch $(STAMP)

# constraints.txt from the versions in .venv (pip freeze; editable and direct-URL installs left
# out), each pinned for the Python of .venv and newer ones: an older Python, which some of those
# releases do not support, gets what requirements.txt's lower bounds allow. Run it after an
# upgrade that passed `make test`.
PY_VERSION = $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
constraints:
	echo "# Written by make constraints from .venv (Python $(PY_VERSION)); see the README." \
		> constraints.txt.tmp
	$(BIN)/python -m pip freeze --exclude-editable | grep -v ' @ ' \
		| sed 's/$$/ ; python_version >= "$(PY_VERSION)"/' >> constraints.txt.tmp
	grep -q '^torch==' constraints.txt.tmp  # the freeze worked: never an empty constraints.txt
	mv constraints.txt.tmp constraints.txt
	touch $(STAMP)

demo: install
	$(BIN)/python Demo-2-TinyConv-TinyData.py

# One pytest worker per core, at most 4 (pytest-xdist); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= auto
test: install
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal

# Under a minute: the label conversion, the datasets, the tutorial's unit tests, one tiny run.
FAST_TESTS := tests/test_custom_tiny.py tests/test_custom_pascal.py tests/test_tutorial_unit_tests.py \
	tests/test_run_experiment.py::test_one_run_with_every_metric_and_artifact
test-fast: install
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 -m "not slow" $(FAST_TESTS)

# Demo-0, Demo-3 and Demo-4 on a synthetic VOC + SBD tree in a temporary folder (no download).
smoke: install
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m src.tools.smoke

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean-runs:
	rm -rf mlflow.db mlruns mlartifacts results optuna.db mlflow.db.lock
