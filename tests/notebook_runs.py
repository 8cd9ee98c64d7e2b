"""Notebooks executed once per test session (nbclient, DSLIB_FAST=1, widget state kept), shared by the HTML page
tests and the real-browser test: what the kernel displayed (`tools.export_html.inventory`) is what the page and
the browser must show."""
from __future__ import annotations

import functools
from pathlib import Path

from tools.export_html import Inventory, execute, inventory

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURES = ROOT / "tests" / "fixtures"
# The small configuration nbval uses: same code path, smaller sizes.
FAST_ENV = {"DSLIB_FAST": "1", "OMP_NUM_THREADS": "2"}


@functools.lru_cache(maxsize=None)
def executed(path: Path):
    """The executed notebook (a NotebookNode; do not modify it)."""
    return execute(path, timeout=900, env=FAST_ENV)


def expected(path: Path) -> Inventory:
    return inventory(executed(path))
