"""The small helper every notebook builder uses: collect markdown and code cells, write a clean notebook.

    from nbbuild import Notebook
    nb = Notebook("03_sparse_attention.ipynb", ids="ch3-{:03d}")
    nb.md("# Title")
    nb.code("x = 1", tags=["parameters"])
    nb.write()

Cells get stable ids (so regenerating gives a clean diff) and no outputs; run the result through nbval.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1]


class Notebook:
    def __init__(self, filename: str, *, ids: str):
        self.path = NOTEBOOKS / filename
        self.ids = ids
        self.cells = []

    def md(self, text: str) -> None:
        self.cells.append(new_markdown_cell(text.strip("\n")))

    def code(self, src: str, tags: list[str] | None = None) -> None:
        cell = new_code_cell(src.strip("\n"))
        if tags:
            cell.metadata["tags"] = tags
        self.cells.append(cell)

    def write(self) -> Path:
        for i, cell in enumerate(self.cells):
            cell["id"] = self.ids.format(i)
        nb = new_notebook(cells=self.cells, metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        })
        nbformat.write(nb, self.path)
        print("wrote", self.path)
        return self.path
