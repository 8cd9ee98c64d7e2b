"""Figures of chapter 3 (sparse attention)."""
from __future__ import annotations

__all__: list[str] = []
