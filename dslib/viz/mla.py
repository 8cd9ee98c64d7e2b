"""Figures of chapter 2 (MLA)."""
from __future__ import annotations

__all__: list[str] = []
