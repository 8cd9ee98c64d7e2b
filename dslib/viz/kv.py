"""Figures of chapter 1 (KV caching)."""
from __future__ import annotations

__all__: list[str] = []
