"""Figures of chapter 4 (MoE routing)."""
from __future__ import annotations

__all__: list[str] = []
