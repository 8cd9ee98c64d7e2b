"""transformers, the tests' outside reference, needs torch >= 2.6 (transformers 5); dslib itself runs on torch >= 2.4.

On an older torch the comparison tests skip with that reason. On a newer one nothing is skipped: a transformers that
fails to import is an error there, never a silent skip.
"""
from __future__ import annotations

import re

import pytest
import torch

TORCH = tuple(int(n) for n in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])
REASON = f"transformers 5, the reference, needs torch >= 2.6; this is torch {torch.__version__}"


def need_transformers(*, module_level: bool = False) -> None:
    """Skip the calling test (or, with module_level, the whole test file) when transformers cannot run here."""
    if TORCH < (2, 6):
        pytest.skip(REASON, allow_module_level=module_level)
