"""`show(obj)`: the real source of a dslib object, highlighted, in the notebook (chapter 1).

Notebooks never paste library code: they show it from the package, so what a learner reads is what runs.
"""
from __future__ import annotations

import inspect


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


def show(obj, *, lines: tuple[int, int] | None = None):
    """Display the source of `obj` with syntax highlighting. `lines=(a, b)` keeps lines a..b (1-based).

    Returns an IPython display object in a notebook, and the plain source text elsewhere.
    """
    text = source_of(obj)
    if lines is not None:
        a, b = lines
        text = "\n".join(text.splitlines()[a - 1 : b])
    try:
        from IPython.display import HTML
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer
    except ImportError:  # plain Python: the text itself
        return text
    where = inspect.getsourcefile(_unwrap(obj)) or ""
    where = where[where.rfind("dslib") :] if "dslib" in where else where
    formatter = HtmlFormatter(noclasses=True, style="default")
    body = highlight(text, PythonLexer(), formatter)
    return HTML(f'<div style="font-size:12px"><div style="color:#666">{where}</div>{body}</div>')
