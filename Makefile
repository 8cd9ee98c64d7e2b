# Two commands matter: `make lab` and `make test`. Both create the environment (.venv) when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# A laptop without a GPU: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# Two install levels: a learner's (`make lab`: torch, the package's own deps, JupyterLab) and a developer's
# (`make test`: also pytest, nbval, transformers as the test oracle, playwright for the browser test).
LAB_STAMP := $(VENV)/.dslib-lab
DEV_STAMP := $(VENV)/.dslib-dev

export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# Notebooks shrink their work under CI (same code path, smaller sizes); `make lab` runs them full size.
TEST_ENV := DSLIB_FAST=1 OMP_NUM_THREADS=2

.PHONY: env env-dev lab lint test test-unit test-notebooks test-browser html bench data strip clean

env: $(LAB_STAMP)
env-dev: $(DEV_STAMP)

# torch (CPU or CUDA build, see TORCH_SPEC / TORCH_INDEX), the package with its own dependencies, JupyterLab.
$(LAB_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[lab]"
	@touch $(LAB_STAMP)

# What the tests need on top: pytest, nbval, nbstripout, nbconvert, transformers (the oracle), playwright.
$(DEV_STAMP): $(LAB_STAMP)
	$(PY) -m pip install -q -e ".[lab,dev]"
	@touch $(DEV_STAMP)

lab: env
	$(BIN)/jupyter lab notebooks/

# Lint (ruff, configured in pyproject.toml; in the dev extra) before any test runs.
lint: env-dev
	$(BIN)/ruff check .

# Lint, then unit tests, reference tests, hygiene tests, the browser test, and every notebook executed by nbval.
test: env-dev lint
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider tests notebooks

test-unit: env-dev
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider tests -m "not browser"

test-notebooks: env-dev
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks

test-browser: env-dev
	$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider tests -m browser

# Executed notebooks as standalone HTML (plotly inlined, works offline) in html/ (nbclient, nbconvert: dev).
html: env-dev
	$(PY) tools/export_html.py notebooks html

# Speed and memory figures, written to data/*.csv (CPU); GPU ones come from benchmarks/gpu_*.py on the H200.
bench: env-dev
	$(PY) benchmarks/notebook_times.py

# Re-create the trained artifacts in data/ (chapters 3 and 4), seeded. Needs only the learner's install.
data: env
	$(PY) -m dslib.train --out data
	$(PY) -m dslib.moe_train --out data

strip: env-dev
	$(PY) -m nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) html .pytest_cache
