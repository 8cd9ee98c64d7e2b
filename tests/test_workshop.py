"""The workshop kit's promise about exercises: every notebook ends with 2-3 exercises whose answers are checked by a
dslib function, and the stub a learner starts from already gets a clear "not yet, because ..." (not a crash).
Uses the notebooks as executed for the browser and page tests (tests/notebook_runs.py)."""
from __future__ import annotations

import re

import pytest
from notebook_runs import NOTEBOOKS, executed

CHECK_CALL = re.compile(r"\b(?:\w+\.)*check_\w+\s*\(")


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return output.get("data", {}).get("text/plain", "")


def exercise_cells(nb):
    """Code cells after the first markdown cell that mentions an exercise, which call a `check_*` function."""
    cells = nb.cells
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and "Exercise" in c.source), None)
    if start is None:
        return []
    return [c for c in cells[start:] if c.cell_type == "code" and CHECK_CALL.search(c.source)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_checked_through_dslib(path):
    nb = executed(path)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert re.search(r"\bdslib\.exercises\b", sources), (
        f"{path.name}: the exercise checks must come from dslib.exercises"
    )
    cells = exercise_cells(nb)
    assert 2 <= len(cells) <= 3, f"{path.name}: {len(cells)} exercise cells call a check_* function (2-3 expected)"
    for cell in cells:
        said = "\n".join(_text(o) for o in cell.outputs)
        # the learner's stub, checked: a Verdict that says what is missing, not a traceback
        assert "not yet, because" in said, f"{path.name}: the stub of\n{cell.source}\ngives\n{said or '(nothing)'}"
        reason = said.split("not yet, because", 1)[1].strip()
        assert len(reason) > 10, f"{path.name}: the 'not yet' of\n{cell.source}\ndoes not say why: {said!r}"
