"""Exercise checks. Solutions live here, not in the notebooks; a check tells the learner "correct" or
"not yet, because …". Module `chN` belongs to chapter N and imports only chapters <= N.

Two kinds of exercise: a number or a formula to work out, and a piece of the model to write (the cache step, the
absorbed attention, the top-k selection and gather, the gate's route, the FP8 dequantisation). For the second kind
the check runs the learner's function on fresh random inputs next to dslib's own, names the typical mistake it
recognises, refuses a function that simply calls dslib's version (`attempt_own`), and, once the function is right,
shows dslib's version to compare with (`Verdict.compare`).
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass, field

import torch


@dataclass
class Verdict:
    """The answer to one exercise check. Truthy when correct; renders as one line in a notebook, followed (when
    correct) by the listings of `compare`, dslib's own version of what the learner wrote."""

    ok: bool
    message: str
    compare: tuple = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return ("✅ correct — " if self.ok else "❌ not yet, because ") + self.message

    def _repr_html_(self) -> str:
        import html

        color = "#1a7f37" if self.ok else "#b35900"
        out = f'<div style="color:{color};font-weight:600">{html.escape(repr(self))}</div>'
        if self.ok and self.compare:
            from dslib.show import listing_html

            listings = "".join(listing_html(obj, css_class="dslib-compare") for obj in self.compare)
            out += f"<details><summary>dslib's version, to compare with yours</summary>{listings}</details>"
        return out


def correct(message: str = "well done.", compare: tuple = ()) -> Verdict:
    return Verdict(True, message, tuple(compare))


def not_yet(reason: str) -> Verdict:
    return Verdict(False, reason)


def attempt(fn, *args, stub_hint: str = "", **kwargs):
    """Call a learner's function; turn `NotImplementedError` or any exception into a Verdict with the reason.
    `stub_hint` is added to the "still a stub" message: where to start."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        hint = f" {stub_hint}" if stub_hint else ""
        return None, not_yet(f"the function is still a stub (it raises NotImplementedError): fill it in.{hint}")
    except Exception as err:  # the learner's code: report, don't crash the notebook
        return None, not_yet(f"calling it raised {type(err).__name__}: {err}")


def attempt_own(fn, *args, modules=(), allow=(), stub_hint: str = "", **kwargs):
    """Like `attempt`, for exercises where the learner writes a piece of dslib: also refuses a function that
    calls into the dslib `modules` it reimplements (any function defined in their source files, except the
    callables in `allow`, e.g. `MLA.w_uk`). Returns (result, None) or (None, Verdict)."""
    files = {inspect.getsourcefile(m) for m in modules}
    allowed = {getattr(f, "__code__", None) for f in allow}
    called: list[str] = []

    def watch(frame, event, arg):
        if event == "call" and not called:
            code = frame.f_code
            if code.co_filename in files and code not in allowed:
                called.append(f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}")

    previous = sys.getprofile()
    sys.setprofile(watch)
    try:
        result, failure = attempt(fn, *args, stub_hint=stub_hint, **kwargs)
    finally:
        sys.setprofile(previous)
    if failure is not None:
        return None, failure
    if called:
        return None, not_yet(f"it calls dslib's `{called[0]}`, the very thing this exercise asks you to write: "
                             "build it from torch operations (the check compares your function with dslib's).")
    return result, None


def fresh_generator() -> torch.Generator:
    """A generator with a new random seed: every check runs on inputs nobody has seen before."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def same(a, b, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Both tensors, same shape, equal up to float rounding."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol))
