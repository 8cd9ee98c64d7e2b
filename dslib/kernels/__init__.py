"""Triton kernels for the GPU path (chapter 6): the same maths as the PyTorch modules, fused.

The PyTorch code of chapters 1-5 is the teaching path and the oracle; each kernel here is tested against it on
CPU under Triton's interpreter (`TRITON_INTERPRET=1`, tiny shapes) and at full width on a GPU. Nothing is
imported from this package until a caller asks for a kernel (`backend="triton"`, or an FP8 linear on a GPU), so
the rest of dslib runs without Triton, with or without CUDA.

    available()     can the kernels run here? (Triton >= 3.6, and a CUDA GPU or the CPU interpreter);
                    unavailable_reason() says why not
    indexer         the lightning indexer's scores and top-k, fused (bf16 / FP8)
    topk            top-k selection by radix select (histograms of key digits, no sort)
    sparse_mla      sparse MLA attention over the selected latents (in-kernel gather; online or two-pass softmax)
    sparse_mla_gluon  the same prefill in Gluon for Hopper: each warpgroup computes different numbers
    fp8             act_quant (e4m3, one power-of-two scale per token per 128 channels) and fp8_linear
    moe             the routed + shared experts of one MoE layer as one grouped FP8 computation
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, set before the kernels load)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest Triton these kernels have run with: 3.6 compiled (the H200 image, torch 2.11) and 3.9 in the CPU
# interpreter (CI). Older ones are not used: untested there, and their interpreter fails on NumPy 2 scalars.
OLDEST_TRITON = (3, 6)


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's version as numbers, e.g. (3, 6, 0); None when Triton is not installed. Read from the
    package metadata, so Triton is not imported (it must see TRITON_INTERPRET before it is)."""
    if importlib.util.find_spec("triton") is None:
        return None
    return _installed_triton_version()


@functools.cache
def _installed_triton_version() -> tuple[int, ...]:
    from importlib import metadata

    for dist in ("triton", "pytorch-triton"):
        try:
            text = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    else:
        import triton

        text = triton.__version__
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def triton_problem() -> str | None:
    """What is wrong with this machine's Triton for the kernels (not installed, or older than 3.6); None if nothing."""
    version = triton_version()
    if version is None:
        return "Triton is not installed (PyTorch's CUDA wheels ship it)"
    if version[:2] < OLDEST_TRITON:
        return (f"Triton {'.'.join(map(str, version))} is older than {'.'.join(map(str, OLDEST_TRITON))}, the oldest "
                "these kernels are tested with (PyTorch >= 2.10 ships it)")
    return None


def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here, in words; None when they can (Triton >= 3.6, and a CUDA device or
    the interpreter)."""
    problem = triton_problem()
    if problem is not None or interpreting():
        return problem
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels, slowly, on the CPU)"
    return None


def available() -> bool:
    """Whether the Triton kernels can run here (`unavailable_reason()` says why not)."""
    return unavailable_reason() is None


SUBMODULES = ("indexer", "topk", "sparse_mla", "sparse_mla_gluon", "fp8", "moe", "launch")

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
