"""Exercise checks of chapter 4."""
from __future__ import annotations

from dslib.exercises import Verdict, attempt, correct, not_yet  # noqa: F401
