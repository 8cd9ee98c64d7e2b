"""Executed notebooks as standalone HTML pages, for sharing before a workshop (tooling, not part of dslib).

    python tools/export_html.py notebooks html            # every notebooks/*.ipynb -> html/*.html (`make html`)
    python tools/export_html.py notebooks html --only 01  # the notebooks whose name starts with 01

Each notebook is executed top to bottom in a fresh kernel (nbclient, widget state kept), then written with
nbconvert's JupyterLab template. Every figure stays interactive (zoom, pan, hover) and works offline: plotly.js is
inlined once per page and nothing is fetched from a CDN. Widgets need a running kernel, so a page shows each
widget as it was when the notebook finished: a `FigureWidget` as its figure, an `interact` as its controls'
values and its current plot. (Maths in markdown is typeset by MathJax when the page is online; offline the TeX
source is shown.)

`inventory(nb)` counts what an executed notebook displays (plots, widget views, sliders); the page test and the
real-browser test (tests/test_browser.py) compare what they see with it.
"""
from __future__ import annotations

import argparse
import base64
import copy
import html
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
_PLOT_DIV = re.compile(r'class="plotly-graph-div"')
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# numpy dtype -> plotly.js typed-array code (FigureWidget sends 1-D numeric arrays as binary buffers).
_TYPED = {"float64": "f8", "float32": "f4", "int32": "i4", "uint32": "u4", "int16": "i2", "uint16": "u2",
          "int8": "i1", "uint8": "u1"}


@dataclass(frozen=True)
class Inventory:
    """What an executed notebook displays: `plots` plotly figures (fig.show(), a figure as a cell's value, a
    FigureWidget, a figure inside a widget's Output), `widgets` top-level widget views, `sliders` slider views."""

    plots: int = 0
    widgets: int = 0
    sliders: int = 0

    def __add__(self, other: "Inventory") -> "Inventory":
        return Inventory(self.plots + other.plots, self.widgets + other.widgets, self.sliders + other.sliders)


# --------------------------------------------------------------------------------------------------------------
# Reading an executed notebook
# --------------------------------------------------------------------------------------------------------------
def widget_state(nb) -> dict:
    """model_id -> {"model_name", "model_module", "state", "buffers"?} as saved by nbclient (empty if none)."""
    return dict(nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {}))


def _model_ids(value) -> list[str]:
    return [v[len("IPY_MODEL_"):] for v in (value or []) if isinstance(v, str) and v.startswith("IPY_MODEL_")]


def is_figure_widget(model: dict) -> bool:
    """A plotly FigureWidget: an anywidget model carrying plotly's `_widget_data` trait."""
    return "_widget_data" in model.get("state", {})


def _html_plots(data: dict) -> int:
    """Plotly figures in an HTML output (plotly's "notebook"-style renderers, `fig.to_html()`)."""
    text = data.get("text/html", "")
    text = "".join(text) if isinstance(text, list) else text
    return len(_PLOT_DIV.findall(text))


def _count_output(output: dict, state: dict, top: bool) -> Inventory:
    data = output.get("data", {})
    # A bundle with plotly's MIME type is drawn from it (JupyterLab picks the richest type), else from its HTML.
    found = Inventory(plots=1 if PLOTLY_MIME in data else _html_plots(data))
    if WIDGET_VIEW_MIME in data:
        found = found + Inventory(widgets=int(top)) + _count_model(data[WIDGET_VIEW_MIME].get("model_id", ""), state)
    return found


def _count_model(model_id: str, state: dict) -> Inventory:
    model = state.get(model_id)
    if model is None:
        return Inventory()
    s = model.get("state", {})
    slider = model.get("model_name", "").endswith("SliderModel")
    found = Inventory(plots=int(is_figure_widget(model)), sliders=int(slider))
    for child in _model_ids(s.get("children")):
        found = found + _count_model(child, state)
    for out in s.get("outputs", []) if model.get("model_name") == "OutputModel" else []:
        found = found + _count_output(out, state, top=False)
    return found


def inventory(nb) -> Inventory:
    """Count the plots, widget views and sliders an executed notebook (with saved widget state) displays.

    A figure inside a widget (a FigureWidget in a VBox, the plot an `interact` shows) counts as a plot; a widget
    displayed twice counts twice, as a browser draws it twice.
    """
    state = widget_state(nb)
    found = Inventory()
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            found = found + _count_output(output, state, top=True)
    return found


# --------------------------------------------------------------------------------------------------------------
# Executing
# --------------------------------------------------------------------------------------------------------------
def _poll_in_slices(channel, slice_s: float = 1.0):
    """Make `channel.get_msg(timeout)` wait in slices of `slice_s` seconds.

    pyzmq's asyncio poll can miss the wake-up of a message that is already there; it then notices the message only
    when its timeout ends (for nbclient: a cell's whole timeout, after which the run goes on as if nothing happened).
    Every new poll first checks the socket, so short slices bound such a stall to `slice_s`.
    """
    from queue import Empty

    original = channel.get_msg

    async def get_msg(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = slice_s if deadline is None else max(0.0, min(slice_s, deadline - time.monotonic()))
            try:
                return await original(timeout=step)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def _client_class():
    from nbclient import NotebookClient

    class Client(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                _poll_in_slices(channel)
            return kc

    return Client


def execute(path: Path, *, timeout: int = 1800, env: dict[str, str] | None = None):
    """Run notebook `path` top to bottom in a fresh kernel started in its folder; return the executed notebook.

    The kernel imports this very `dslib` (its folder is put first on PYTHONPATH) and inherits this process's
    environment plus `env` (e.g. {"DSLIB_FAST": "1"}). A failing cell raises nbclient's CellExecutionError,
    which names the cell and shows its traceback.
    """
    import nbformat
    from traitlets.config import Config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    nb = nbformat.read(path, as_version=4)
    kernel_env = dict(os.environ)
    kernel_env.update(env or {})
    here = str(Path(__file__).resolve().parents[1])
    kernel_env["PYTHONPATH"] = os.pathsep.join([here] + ([kernel_env["PYTHONPATH"]] if kernel_env.get("PYTHONPATH")
                                                         else []))
    # Kernel sockets as files beside the kernel's connection file (IPC), not TCP ports: on a machine where many
    # kernels start at once, picking "free" ports races with the others.
    with tempfile.TemporaryDirectory(prefix="dslib-kernel-") as sockets:
        config = Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "k")}})
        client = _client_class()(
            nb, timeout=timeout, kernel_name="python3", store_widget_state=True, config=config,
            resources={"metadata": {"path": str(path.parent.resolve())}},
        )
        client.execute(env=kernel_env)
    return nb


# --------------------------------------------------------------------------------------------------------------
# Static (offline) rendering of plots and widgets
# --------------------------------------------------------------------------------------------------------------
def plot_html(fig: dict) -> str:
    """One interactive plotly figure as a <div> + script (plotly.js itself is inlined once per page)."""
    import plotly.io as pio

    layout = fig.get("layout") or {}
    height = layout.get("height") if isinstance(layout.get("height"), (int, float)) else 450
    return pio.to_html(
        {"data": fig.get("data") or [], "layout": layout}, config=fig.get("config") or None,
        include_plotlyjs=False, full_html=False, validate=False, default_height=f"{int(height)}px",
    )


def _restore_buffers(model: dict) -> dict:
    """Put a widget's binary buffers back into its state, numeric arrays as plotly.js typed arrays {dtype, bdata}."""
    state = copy.deepcopy(model.get("state", {}))
    for buf in model.get("buffers", []):
        path, data = buf["path"], buf["data"]
        if buf.get("encoding", "base64") != "base64":
            data = base64.b64encode(data.encode() if isinstance(data, str) else data).decode()
        parent = state
        for key in path[:-2]:
            parent = parent[key]
        holder = parent[path[-2]] if len(path) >= 2 else None
        if isinstance(holder, dict) and path[-1] == "buffer" and "dtype" in holder:
            parent[path[-2]] = {"dtype": _TYPED.get(holder["dtype"], holder["dtype"]), "bdata": data}
        elif len(path) >= 2:
            holder[path[-1]] = data
    return state


def _output_html(output: dict, state: dict) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return f"<pre>{html.escape(output.get('text', ''))}</pre>"
    if kind == "error":
        return f"<pre>{html.escape(_ANSI.sub('', chr(10).join(output.get('traceback', []))))}</pre>"
    data = output.get("data", {})
    if PLOTLY_MIME in data:
        return plot_html(data[PLOTLY_MIME])
    if WIDGET_VIEW_MIME in data:
        return widget_html(data[WIDGET_VIEW_MIME].get("model_id", ""), state)
    if "text/html" in data:
        return "".join(data["text/html"]) if isinstance(data["text/html"], list) else data["text/html"]
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            return f'<img src="data:{mime};base64,{data[mime]}"/>'
    if "image/svg+xml" in data:
        return data["image/svg+xml"]
    if "text/plain" in data:
        return f"<pre>{html.escape(data['text/plain'])}</pre>"
    return ""


def widget_html(model_id: str, state: dict) -> str:
    """A widget view as static HTML: figures stay interactive plots, controls show their current value."""
    model = state.get(model_id)
    if model is None:
        return '<div class="dslib-widget">(a widget that was not saved)</div>'
    name, s = model.get("model_name", ""), model.get("state", {})
    if is_figure_widget(model):
        s = _restore_buffers(model)
        return plot_html({"data": s.get("_widget_data"), "layout": s.get("_widget_layout"), "config": s.get("_config")})
    if name == "OutputModel":
        return "".join(_output_html(o, state) for o in s.get("outputs", []))
    if "children" in s:
        direction, align = ("row", "center") if name == "HBoxModel" else ("column", "stretch")
        inner = "".join(f"<div>{widget_html(c, state)}</div>" for c in _model_ids(s["children"]))
        style = f"display:flex;flex-direction:{direction};align-items:{align};gap:4px"
        return f'<div class="dslib-widget" style="{style}">{inner}</div>'
    if name in ("HTMLModel", "HTMLMathModel"):
        return s.get("value", "")
    label = html.escape(str(s.get("description") or name.replace("Model", "")))
    if name.endswith("ProgressModel"):  # e.g. a tqdm bar: HTML description | progress | HTML counts
        return f'<progress value="{s.get("value", 0)}" max="{s.get("max", 100)}" style="width:200px"></progress>'
    if name == "ButtonModel":
        return f'<button disabled title="runs in JupyterLab">{label}</button>'
    if "_options_labels" in s and "index" in s:  # Dropdown, SelectionSlider, RadioButtons, ...: they sync an index
        labels, index = s["_options_labels"], s["index"]
        value = labels[index] if isinstance(index, int) else (", ".join(labels[i] for i in index) if index else "")
    elif "value" in s:
        value = s["value"]
    else:
        return ""
    return (f'<div class="dslib-widget" title="interactive when the notebook runs in JupyterLab">'
            f"<b>{label}</b> = <code>{html.escape(str(value))}</code></div>")


def to_static(nb):
    """A copy of executed `nb` whose plots and widgets are plain HTML outputs (see `widget_html`), without the
    widget state (which would make nbconvert load a widget manager from a CDN)."""
    nb = copy.deepcopy(nb)
    state = widget_state(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.outputs:
            data = output.get("data", {})
            if PLOTLY_MIME in data or WIDGET_VIEW_MIME in data:
                rendered = _output_html(output, state)
                output["data"] = {"text/html": rendered, "text/plain": data.get("text/plain", "")}
    nb.metadata.pop("widgets", None)
    return nb


# nbconvert's JupyterLab template without the CDN scripts it would load (require.js, the widget manager),
# with plotly.js inlined in the head instead.
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>
<script type="text/javascript">{{ resources.dslib_plotly_js }}</script>
<style>.dslib-widget { font-family: var(--jp-ui-font-family); font-size: 13px; padding: 2px 0; }</style>
{%- endblock extra_css -%}
"""


def page_html(executed_nb) -> str:
    """The standalone HTML page of an executed notebook."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs

    exporter = HTMLExporter(extra_loaders=[DictLoader({"dslib_offline.html.j2": _TEMPLATE})],
                            template_file="dslib_offline.html.j2")
    body, _ = exporter.from_notebook_node(to_static(executed_nb), resources={"dslib_plotly_js": get_plotlyjs()})
    return body


def count_plots_in_page(page: str) -> int:
    """How many plotly figures a page built by `page_html` draws (one `plotly-graph-div` each)."""
    return len(_PLOT_DIV.findall(page))


def export(src: Path, dest_dir: Path, *, timeout: int = 1800,
           env: dict[str, str] | None = None) -> tuple[Path, Inventory]:
    """Execute notebook `src` and write `dest_dir/<name>.html`; return the page's path and what it shows."""
    nb = execute(src, timeout=timeout, env=env)
    found = inventory(nb)
    page = page_html(nb)
    drawn = count_plots_in_page(page)
    if drawn != found.plots:
        raise RuntimeError(f"{src.name}: the page draws {drawn} plots, the notebook displayed {found.plots}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / (Path(src).stem + ".html")
    out.write_text(page, encoding="utf-8")
    return out, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/export_html.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a folder of notebooks (or one .ipynb)")
    parser.add_argument("dest", type=Path, help="folder for the .html pages (created)")
    parser.add_argument("--only", default="", help="only notebooks whose file name starts with this")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run (default 1800)")
    args = parser.parse_args(argv)
    notebooks = [args.src] if args.src.suffix == ".ipynb" else sorted(args.src.glob("*.ipynb"))
    notebooks = [p for p in notebooks if p.name.startswith(args.only)]
    if not notebooks:
        print(f"no notebooks found in {args.src} (with --only {args.only!r})", file=sys.stderr)
        return 2
    for nb in notebooks:
        start = time.perf_counter()
        out, found = export(nb, args.dest, timeout=args.timeout)
        size = out.stat().st_size / 2**20
        seconds = time.perf_counter() - start
        print(f"{out}  {found.plots} plots, {found.widgets} widgets  ({size:.1f} MiB, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
