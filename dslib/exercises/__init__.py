"""Exercise checks. Solutions live here, not in the notebooks; a check tells the learner "correct" or
"not yet, because …". Module `chN` belongs to chapter N and imports only chapters <= N.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    """The answer to one exercise check. Truthy when correct; renders as one line in a notebook."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return ("✅ correct — " if self.ok else "❌ not yet, because ") + self.message

    def _repr_html_(self) -> str:
        color = "#1a7f37" if self.ok else "#b35900"
        return f'<div style="color:{color};font-weight:600">{self!r}</div>'


def correct(message: str = "well done.") -> Verdict:
    return Verdict(True, message)


def not_yet(reason: str) -> Verdict:
    return Verdict(False, reason)


def attempt(fn, *args, **kwargs):
    """Call a learner's function; turn `NotImplementedError` or any exception into a Verdict with the reason."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        return None, not_yet("the function is still a stub (it raises NotImplementedError): fill it in.")
    except Exception as err:  # the learner's code: report, don't crash the notebook
        return None, not_yet(f"calling it raised {type(err).__name__}: {err}")
