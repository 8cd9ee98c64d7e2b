"""What each install command installs: `make lab` only what a learner needs, `make test` the developer's tools too."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_ONLY = {"pytest", "pytest-timeout", "nbval", "nbstripout", "nbconvert", "transformers", "playwright"}
LEARNER = {"torch", "jupyterlab", "ipywidgets", "plotly"}


def _names(specs) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", s.strip(), maxsplit=1)[0].lower() for s in specs}


def _project():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dry_run(target: str) -> str:
    """The commands `make -n TARGET` would run in a fresh checkout (stamps and .venv pretended missing)."""
    out = subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_learner_install_is_lean():
    project = _project()
    learner = _names(project["dependencies"]) | _names(project["optional-dependencies"]["lab"])
    assert LEARNER <= learner, f"a learner needs {sorted(LEARNER - learner)}"
    assert not learner & DEV_ONLY, f"the learner's install pulls developer tools: {sorted(learner & DEV_ONLY)}"
    assert DEV_ONLY <= _names(project["optional-dependencies"]["dev"])


def test_make_lab_installs_the_lab_extra_only():
    lab = _dry_run("lab")
    assert '-e ".[lab]"' in lab and "dev]" not in lab, lab


@pytest.mark.parametrize("target", ["test", "test-unit", "test-notebooks", "html", "bench"])
def test_make_test_installs_the_dev_extra(target):
    assert '-e ".[lab,dev]"' in _dry_run(target)
