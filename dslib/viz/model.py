"""Figures of chapter 5 (the full model)."""
from __future__ import annotations

__all__: list[str] = []
