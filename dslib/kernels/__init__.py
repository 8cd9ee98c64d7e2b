"""Triton kernels for the GPU path (chapter 6): the same maths as the PyTorch modules, fused.

The PyTorch code of chapters 2-5 stays the teaching path and the oracle; each kernel here is tested against it
(on CPU under `TRITON_INTERPRET=1`, tiny shapes; at full width on a GPU). Submodules are imported on use, so
`import dslib.kernels` works on any machine, with or without CUDA or Triton.
"""
from __future__ import annotations

import importlib.util
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, set before the kernels load)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the Triton kernels can run here: Triton importable and a CUDA device present (or the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()
