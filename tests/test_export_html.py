"""`make html` (python tools/export_html.py): executed notebooks as standalone pages whose plots work offline."""
from __future__ import annotations

import re

import pytest
from notebook_runs import FIXTURES, NOTEBOOKS, executed

import tools.export_html as ex

GOOD = FIXTURES / "good.ipynb"
MATHJAX = "mathjax"  # the one script a page may load from the web (maths typesetting; TeX shows without it)


def external_scripts(page: str) -> list[str]:
    return [src for src in re.findall(r'<script[^>]*\ssrc="([^"]+)"', page) if MATHJAX not in src.lower()]


def check_page(page: str, plots: int, name: str):
    drawn = ex.count_plots_in_page(page)
    assert drawn == plots, f"{name}: page draws {drawn} plots, notebook showed {plots}"
    assert page.count("Plotly.newPlot(") >= plots, f"{name}: a plot div without its drawing script"
    assert external_scripts(page) == [], f"{name}: the page loads scripts from the web: {external_scripts(page)}"
    assert "plotly.js v" in page, f"{name}: plotly.js is not inlined"
    assert "application/vnd.jupyter.widget-state+json" not in page, f"{name}: widget state left in the page"


def test_inventory_counts_every_kind_of_figure():
    found = ex.inventory(executed(GOOD))
    # fig.show(), a figure as value, a FigureWidget, an interact's plot, a FigureWidget inside a VBox
    assert found == ex.Inventory(plots=5, widgets=3, sliders=2)


def test_inventory_of_an_unexecuted_notebook_is_empty():
    import nbformat

    assert ex.inventory(nbformat.read(GOOD, as_version=4)) == ex.Inventory()


def test_static_copy_replaces_plots_and_widgets_by_html():
    nb = executed(GOOD)
    static = ex.to_static(nb)
    assert "widgets" not in static.metadata and "widgets" in nb.metadata  # the original is left alone
    kinds = [k for c in static.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})]
    assert ex.PLOTLY_MIME not in kinds and ex.WIDGET_VIEW_MIME not in kinds
    html = "".join(o["data"]["text/html"] for c in static.cells if c.cell_type == "code" for o in c.outputs
                   if "text/html" in o.get("data", {}))
    assert '"bdata":"AABAQAAAgD8AAABA"' in html.replace(" ", "")  # the FigureWidget's float32 buffer, as a typed array
    # controls show their values: sliders sync `value`, a drop-down syncs an index into its labels
    assert "<b>n</b> = <code>1</code>" in html and "<b>scale</b> = <code>1.0</code>" in html
    assert "<b>color</b> = <code>royalblue</code>" in html


def test_fixture_page():
    page = ex.page_html(executed(GOOD))
    check_page(page, 5, GOOD.name)


def test_cli_writes_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "execute", lambda path, **kw: executed(path))
    assert ex.main([str(FIXTURES), str(tmp_path / "out"), "--only", "good"]) == 0
    page = (tmp_path / "out" / "good.html").read_text()
    check_page(page, 5, "good.html")
    assert ex.main([str(FIXTURES), str(tmp_path / "out"), "--only", "nothing-matches"]) == 2


def test_missing_notebook_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebook at"):
        ex.execute(tmp_path / "nope.ipynb")


@pytest.mark.browser
def test_fixture_page_draws_its_plots_offline(tmp_path):
    from browser_util import need_browser, render_page_offline

    need_browser()
    path = tmp_path / "good.html"
    path.write_text(ex.page_html(executed(GOOD)), encoding="utf-8")
    plots, errors = render_page_offline(path)
    assert plots == 5, errors
    assert not [e for e in errors if "uncaught" in e], errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_page(path):
    nb = executed(path)
    check_page(ex.page_html(nb), ex.inventory(nb).plots, path.name)


def test_widget_html_of_a_progress_bar_and_unknown_models():
    """A tqdm bar (HBox of HTML, FloatProgress, HTML) reads as text around a <progress>; a missing model says so."""
    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "state": state}

    state = {
        "box": model("HBoxModel", children=["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]),
        "a": model("HTMLModel", value="writing: 100%"),
        "b": model("FloatProgressModel", value=8.0, max=8.0, description=""),
        "c": model("HTMLModel", value="8/8 [00:01]"),
    }
    html = ex.widget_html("box", state)
    assert "flex-direction:row" in html and '<progress value="8.0" max="8.0"' in html
    assert html.index("writing: 100%") < html.index("<progress") < html.index("8/8 [00:01]")
    assert "not saved" in ex.widget_html("missing", state)
