# Two commands matter: `make lab` and `make test`. Both create the environment (.venv) when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# A laptop without a GPU: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.dslib-installed

export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# Notebooks shrink their work under CI (same code path, smaller sizes); `make lab` runs them full size.
TEST_ENV := DSLIB_FAST=1 OMP_NUM_THREADS=2

.PHONY: env lab lint test test-unit test-notebooks test-browser html bench data strip clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[lab,dev]"
	@touch $(STAMP)

lab: env
	$(BIN)/jupyter lab notebooks/

# Lint (ruff, configured in pyproject.toml) before any test runs.
lint: env
	$(BIN)/ruff check .

# Lint, then unit tests, reference tests, hygiene tests, the browser test, and every notebook executed by nbval.
test: env lint
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider tests notebooks

test-unit: env
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider tests -m "not browser"

test-notebooks: env
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

test-browser: env
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider tests -m browser

# Executed notebooks as standalone HTML (plotly inlined, works offline) in html/.
html: env
	$(PY) tools/export_html.py notebooks html

# Speed and memory figures, written to data/*.csv (CPU); GPU ones come from benchmarks/gpu_*.py on the H200.
bench: env
	$(PY) benchmarks/notebook_times.py

# Re-create the trained artifacts in data/ (chapters 3 and 4), seeded.
data: env
	$(PY) -m dslib.train --out data
	$(PY) -m dslib.moe_train --out data

strip:
	$(PY) -m nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) html .pytest_cache
