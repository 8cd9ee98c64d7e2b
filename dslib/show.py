"""`show(obj)`: the real source of a dslib object, highlighted, in the notebook (chapter 1).

Notebooks never paste library code: they show it from the package, so what a learner reads is what runs.
"""
from __future__ import annotations

import html
import inspect

# Every listing carries this class, so a test can count the listings an executed notebook displays.
SHOW_CLASS = "dslib-show"


def _unwrap(obj):
    """A Triton kernel (`@triton.jit`) is shown as the Python function it was written as (kept as `.fn`)."""
    if not inspect.isroutine(obj) and not inspect.ismodule(obj) and callable(getattr(obj, "fn", None)):
        return obj.fn
    return obj


def source_of(obj) -> str:
    """The source text of a function, class, method, module or Triton kernel (`inspect.getsource`)."""
    obj = _unwrap(obj)
    try:
        return inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise TypeError(f"show() needs a function, class, method or module defined in Python, got {obj!r}") from err


def _kernel():
    """The running Jupyter kernel's shell, or None (plain Python, or a terminal IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def show(obj, *, lines: tuple[int, int] | None = None):
    """Display the source of `obj` with syntax highlighting. `lines=(a, b)` keeps lines a..b (1-based).

    In a notebook the listing is displayed at once (so several `show` calls in one cell all appear) and nothing is
    returned; elsewhere (plain Python, a terminal) the source text is returned.
    """
    text = source_of(obj)
    if lines is not None:
        a, b = lines
        text = "\n".join(text.splitlines()[a - 1 : b])
    if _kernel() is None:
        return text
    from IPython.display import HTML, display
    display(HTML(listing_html(obj, text)))
    return None


def listing_html(obj, text: str | None = None, *, css_class: str = SHOW_CLASS) -> str:
    """The highlighted listing `show` displays, as HTML (`text` defaults to the whole source of `obj`). Needs
    pygments (installed with JupyterLab); without it the source is shown as preformatted text."""
    text = source_of(obj) if text is None else text
    obj = _unwrap(obj)
    where = inspect.getsourcefile(obj) or ""
    where = where[where.rfind("dslib") :] if "dslib" in where else where
    name = html.escape(getattr(obj, "__qualname__", getattr(obj, "__name__", "")), quote=True)
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        body = highlight(text, PythonLexer(), HtmlFormatter(noclasses=True, style="default"))
    except ImportError:
        body = f"<pre>{html.escape(text)}</pre>"
    return (f'<div class="{css_class}" data-source="{name}" style="font-size:12px">'
            f'<div style="color:#666">{html.escape(where)}</div>{body}</div>')
