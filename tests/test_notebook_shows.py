"""Every `show(...)` in a notebook displays its listing in the executed notebook (item: code the text promises is
shown). `show` displays at once, so several calls in one cell all appear; this test counts, cell by cell, the
listings a cell displayed against the `show` calls it makes. Uses the notebooks executed once per session."""
from __future__ import annotations

import ast

import pytest
from notebook_runs import NOTEBOOKS, executed
from test_links import NOT_IN_REPO

from dslib.show import SHOW_CLASS, show


def show_calls(source: str) -> int:
    """`show(x)` / `dslib.show(x)` calls in a cell (a figure's `fig.show()` has no argument and is not counted)."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    count = 0
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            plain = isinstance(f, ast.Name) and f.id == "show"
            qualified = (isinstance(f, ast.Attribute) and f.attr == "show" and isinstance(f.value, ast.Name)
                         and f.value.id == "dslib")
            if plain or qualified:
                count += 1
    return count


def listings(cell) -> int:
    n = 0
    for out in cell.get("outputs", []):
        html = out.get("data", {}).get("text/html", "")
        html = "".join(html) if isinstance(html, list) else html
        n += html.count(f'class="{SHOW_CLASS}"')
    return n


def test_show_calls_are_counted():
    assert show_calls("show(a)\nshow(b)  # two\nfig.show()\ndslib.show(c)") == 3
    assert show_calls("x = 1") == 0


def test_show_outside_a_notebook_returns_the_text():
    assert "def show_calls" in show(show_calls)
    assert show(show_calls, lines=(1, 1)).startswith("def show_calls")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_show_is_displayed(path):
    nb = executed(path)
    missing = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        want = show_calls(cell.source)
        if want and listings(cell) != want:
            missing.append(f"cell {i}: {want} show() call(s), {listings(cell)} listing(s) displayed:\n{cell.source}")
        for out in cell.get("outputs", []):  # a listing (a docstring) must not cite files learners do not have
            text = str(out.get("data", {}).get("text/html", "")) + str(out.get("text", ""))
            if NOT_IN_REPO.search(text):
                missing.append(f"cell {i} displays a reference to {NOT_IN_REPO.search(text).group(0)}:\n{cell.source}")
    assert not missing, f"{path.name}: " + "\n\n".join(missing)
