"""Shared memory, registers and spills of the attention kernels for Hopper (sm_90a), compiled without a GPU.

Triton compiles a kernel for a named target on any machine; its wheel ships ptxas, whose `-v` report gives
registers and spill bytes per thread. This answers "does this tile fit an SM?" before any GPU time is spent
(what runs fastest still needs the GPU: benchmarks/gpu_kernels.py). Integer arguments that are multiples of 16
on the GPU (strides, sizes) are marked so, as Triton's launcher would; without that, loads do not vectorise
and the pipeliner does not engage.

    python benchmarks/kernel_resources.py          # about a minute on 2 CPU cores
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dslib.kernels import indexer as kidx  # noqa: E402
from dslib.kernels import sparse_mla as kmla  # noqa: E402

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on H100 / H200
SIZES = {"S", "T", "H", "TOPK", "keys_per_split", "N", "seg_len", "slots_per_split", "N_SLOTS"}  # multiples of 16 at the 671B dims


def ptxas() -> Path:
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton emits
        if (bin_dir / name).exists():
            return bin_dir / name
    raise FileNotFoundError(f"no ptxas in {bin_dir}")


def report(fn, types: dict, consts: dict, num_warps: int, num_stages: int) -> dict:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, "*bf16" if name.endswith("_ptr") else "i32")
        if name.endswith("_ptr") or name.startswith(("stride", "s_")) or name in SIZES:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        log = subprocess.run([str(ptxas()), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return {"shared_kb": round(kernel.metadata.shared / 1024, 1), "fits": kernel.metadata.shared <= SMEM_LIMIT,
            "registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def main() -> int:
    mla = dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64)
    cases = []
    for fp8 in (False, True):
        dt = "*fp8e4nv" if fp8 else "*bf16"
        types = dict(q_ptr=dt, k_ptr=dt, w_ptr="*fp32", k_scale_ptr="*fp32", pos_ptr="*i64", out_ptr="*fp32")
        cfg = kidx.PREFILL_CONFIG
        cases.append((f"index prefill {'fp8' if fp8 else 'bf16'} {cfg}", kidx._index_scores_kernel, types,
                      dict(D=128, BLOCK_D=128, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FP8=fp8), cfg))
        cfg = kidx.DECODE_CONFIG
        cases.append((f"index decode {'fp8' if fp8 else 'bf16'} {cfg}", kidx._index_scores_decode_kernel, types,
                      dict(D=128, BLOCK_D=128, BLOCK_H=64, BLOCK_N=cfg["BLOCK_N"], FP8=fp8), cfg))
    for cfg in ({"BLOCK_H": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
                {"BLOCK_H": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}):
        tiles = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"])
        for split in (False, True):
            types = dict(sel_ptr="*i64", out_ptr="*fp32" if split else "*bf16", lse_ptr="*fp32", qk_scale="fp32")
            cases.append((f"sparse_mla split={split} {cfg}", kmla._sparse_mla_kernel, types,
                          {**mla, **tiles, "SPLIT": split}, cfg))
        types = dict(pos_ptr="*i64", out_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
        cases.append((f"dense_mla split=True {cfg}", kmla._dense_mla_kernel, types, {**mla, **tiles, "SPLIT": True}, cfg))
    for name, fn, types, consts, cfg in cases:
        try:
            print(f"{name:80s} {report(fn, types, consts, cfg['num_warps'], cfg['num_stages'])}", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"{name:80s} FAILED {type(err).__name__}: {err}"[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
