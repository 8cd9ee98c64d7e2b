"""Triton kernels for the GPU path (chapter 6): the same maths as the PyTorch modules, fused.

The PyTorch code of chapters 1-5 is the teaching path and the oracle; each kernel here is tested against it on
CPU under Triton's interpreter (`TRITON_INTERPRET=1`, tiny shapes) and at full width on a GPU. Nothing is
imported from this package until a caller asks for a kernel (`backend="triton"`, or an FP8 linear on a GPU), so
the rest of dslib runs without Triton, with or without CUDA.

    available()     can the kernels run here? (Triton importable, and a CUDA GPU or the CPU interpreter)
    indexer         the lightning indexer's scores and top-k, fused (bf16 / FP8)
    topk            top-k selection by radix select (histograms of key digits, no sort)
    sparse_mla      sparse MLA attention over the selected latents (in-kernel gather; online or two-pass softmax)
    fp8             act_quant (e4m3, one power-of-two scale per token per 128 channels) and fp8_linear
    moe             the routed + shared experts of one MoE layer as one grouped FP8 computation
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


SUBMODULES = ("indexer", "topk", "sparse_mla", "fp8", "moe", "launch")

# Tile configurations and variants measured fastest on a GPU (`benchmarks/gpu_kernels.py` writes them to
# gpu_kernels_best.json; `use_tuning` reads that file). A kernel call that passes no `config` / `variant` /
# `method` of its own uses these; empty = each kernel's built-in defaults. Only speed depends on them: every
# configuration the benchmark may choose was checked against the PyTorch path first.
TUNED: dict[str, dict] = {}


def use_tuning(path) -> dict[str, dict]:
    """Adopt the configurations in a `gpu_kernels_best.json` (e.g. data/gpu_kernels/gpu_kernels_best.json, measured
    on an H200): {"sparse_prefill": {"variant": ..., tiles}, "index_prefill_fp8": {tiles}, "topk_prefill":
    {"method": ..., "score_dtype": ...}, ...}. Returns what is now in use."""
    import json
    from pathlib import Path

    best = json.loads(Path(path).read_text())["best"]
    TUNED.clear()
    TUNED.update({name: dict(value) for name, value in best.items() if isinstance(value, dict) and value})
    return {name: dict(value) for name, value in TUNED.items()}


def tuned(name: str) -> dict:
    """A copy of the tuned entry `name` ({} when there is none)."""
    return dict(TUNED.get(name, {}))


def __getattr__(name: str):
    """`dslib.kernels.indexer` etc. load on first access (callers do `importlib.import_module("dslib.kernels")` and
    then use `kernels.indexer.index_topk`), so importing the package alone loads no Triton code."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
