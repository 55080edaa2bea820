# One home for setup: the README's two commands and .ci/run call these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A CPU torch from the machine's disk first: a bare `torch` requirement would pull a multi-GB CUDA build.
setup: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[train,dev]"

# The main job: site exports -> de-identifying ingest -> pool + leakage audit -> train -> ONNX package -> triage table.
demo: setup
	$(BIN)/python scripts/make_sites.py
	$(BIN)/python scripts/ingest_sites.py
	$(BIN)/python scripts/train.py experiment=pneumonia_sites
	$(BIN)/medtriage score models/pneumonia-sites-r18 $$($(BIN)/python scripts/pick_files.py data/pool/pneumonia_sites)

# Lint and format (ruff), import contracts (import-linter, [tool.importlinter] in pyproject.toml), then the suite in
# TEST_WORKERS processes (pytest-xdist), each taking a whole module at a time: a module's shared fixtures are made once.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadscope
