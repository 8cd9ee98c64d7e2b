"""Shared memory, registers, spills and tensor-core layout of the Triton kernels for Hopper (sm_90a), compiled
without a GPU.

Triton compiles a kernel for a named target on any machine; its wheel ships ptxas, whose `-v` report gives
registers and spill bytes per thread. This answers "does this tile fit an SM?" before any GPU time is spent
(what runs fastest still needs the GPU: benchmarks/gpu_kernels.py). Integer arguments that are multiples of 16
on the GPU (strides, sizes) are marked so, as Triton's launcher would; without that, loads do not vectorise
and the pipeliner does not engage. Per kernel it also reads the compiled IR: the warp layout of each tensor-core
product (warps [rows, cols]: [8, 1] on a 64-row tile means two warpgroups compute the same rows) and the number
of wgmma and cp.async instructions (0 cp.async: the loads are not pipelined).

    python benchmarks/kernel_resources.py            # a few minutes on 2 CPU cores
    python benchmarks/kernel_resources.py two_pass   # only the cases whose name contains "two_pass"
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
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (benchmarks/gluon_sparse_mla_trial.py)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    kernel = triton.compile(source(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        log = subprocess.run([str(ptxas()), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True,
                             text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    warps = re.findall(r"nvidia_mma<\{versionMajor = 3, versionMinor = \d+, warpsPerCTA = \[(\d+), (\d+)\]",
                       kernel.asm["ttgir"])
    ptx = kernel.asm["ptx"]
    return {"shared_kb": round(kernel.metadata.shared / 1024, 1), "fits": kernel.metadata.shared <= SMEM_LIMIT,
            "registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None,
            "mma_warps": ["x".join(w) for w in warps], "wgmma": ptx.count("wgmma.mma_async"),
            "cp_async": len(re.findall(r"cp\.async\.c[ag]", ptx))}


def cases() -> list:
    """(name, kernel, argument types, constexprs, launch config) of every kernel at the 671B dims, for the
    configurations benchmarks/gpu_kernels.py sweeps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_kernels as bench

    from dslib.kernels import topk as ktopk

    mla = dict(C=512, R=64, BLOCK_C=512, BLOCK_R=64)
    out = []
    for fp8 in (False, True):
        dt = "*fp8e4nv" if fp8 else "*bf16"
        types = dict(q_ptr=dt, k_ptr=dt, w_ptr="*fp32", k_scale_ptr="*fp32", pos_ptr="*i64", out_ptr="*fp32")
        for cfg in bench.SWEEP["index_prefill_fp8" if fp8 else "index_prefill_bf16"]:
            out.append((f"index prefill {'fp8' if fp8 else 'bf16'} {cfg}", kidx._index_scores_kernel, types,
                        dict(D=128, BLOCK_D=128, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FP8=fp8), cfg))
        cfg = kidx.DECODE_CONFIG
        out.append((f"index decode {'fp8' if fp8 else 'bf16'} {cfg}", kidx._index_scores_decode_kernel, types,
                    dict(D=128, BLOCK_D=128, BLOCK_H=64, BLOCK_N=cfg["BLOCK_N"], FP8=fp8), cfg))
    one = [c for c in bench.SWEEP["sparse_prefill"] + bench.SWEEP["dense_decode"] if c["variant"] == "one_pass"]
    for cfg in [c for i, c in enumerate(one) if c not in one[:i]]:
        tiles = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"])
        for split in (False, True):
            types = dict(sel_ptr="*i64", out_ptr="*fp32" if split else "*bf16", lse_ptr="*fp32", qk_scale="fp32")
            out.append((f"one_pass sparse_mla split={split} {tiles}", kmla._sparse_mla_kernel, types,
                        {**mla, **tiles, "SPLIT": split, "OFF32": True}, cfg))
        types = dict(pos_ptr="*i64", out_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
        out.append((f"one_pass dense_mla split=True {tiles}", kmla._dense_mla_kernel, types,
                    {**mla, **tiles, "SPLIT": True, "OFF32": True}, cfg))
    two = [c for c in bench.SWEEP["sparse_prefill"] + bench.SWEEP["dense_decode"] if c["variant"] == "two_pass"]
    seen = set()
    for cfg in two:
        score = (cfg["BLOCK_N"], cfg["SCORE_BLOCK_H"], cfg["SCORE_WARPS"], cfg["SCORE_STAGES"])
        value = (cfg["BLOCK_N"], cfg["VALUE_BLOCK_H"], cfg["VALUE_BLOCK_C"], cfg["VALUE_WARPS"], cfg["VALUE_STAGES"])
        for gather in (True, False):
            if (score, gather) not in seen:
                seen.add((score, gather))
                types = dict(keys_ptr="*i64", p_ptr="*bf16", mb_ptr="*fp32", ms_ptr="*fp32", ls_ptr="*fp32",
                             qk_scale="fp32")
                out.append((f"two_pass scores gather={gather} N{score[0]} h{score[1]} w{score[2]} s{score[3]}",
                            kmla._mla_scores_kernel, types,
                            {**mla, "BLOCK_H": score[1], "BLOCK_N": score[0], "GATHER": gather},
                            dict(num_warps=score[2], num_stages=score[3])))
            for split in (False, True):
                if (value, gather, split) in seen:
                    continue
                seen.add((value, gather, split))
                types = dict(keys_ptr="*i64", p_ptr="*bf16", mb_ptr="*fp32", ms_ptr="*fp32", ls_ptr="*fp32",
                             out_ptr="*fp32" if split else "*bf16")
                out.append((f"two_pass values gather={gather} split={split} N{value[0]} h{value[1]} c{value[2]} "
                            f"w{value[3]} s{value[4]}", kmla._mla_values_kernel, types,
                            dict(C=512, BLOCK_H=value[1], BLOCK_C=value[2], BLOCK_N=value[0], GATHER=gather,
                                 SPLIT=split), dict(num_warps=value[3], num_stages=value[4])))
    out.append(("two_pass sum of splits", kmla._sum_splits_kernel, dict(part_ptr="*fp32", out_ptr="*bf16"),
                dict(C=512, BLOCK_C=512, BLOCK_H=kmla.COMBINE_BLOCK_H), dict(num_warps=4, num_stages=1)))
    for dtype, bits in (("*bf16", 16), ("*fp32", 32)):
        radix = dict(KEY_BITS=bits, DIGIT=ktopk.DIGIT_BITS, BINS=ktopk.BINS, MAX_SEGS=ktopk.MAX_SEGMENTS, CAUSAL=True,
                     PAD=16, BLOCK=ktopk.RADIX_CONFIG["BLOCK"])
        launch = dict(num_warps=ktopk.RADIX_CONFIG["num_warps"], num_stages=1)
        passes = -(-bits // ktopk.DIGIT_BITS)
        out.append((f"radix top-k histogram {dtype[1:]} (pass 1 of {passes})", ktopk._radix_hist_kernel,
                    dict(x_ptr=dtype, pos_ptr="*i64", hist_ptr="*i32"), {**radix, "PASS": 1}, launch))
        out.append((f"radix top-k collect {dtype[1:]}", ktopk._radix_select_kernel,
                    dict(x_ptr=dtype, pos_ptr="*i64", hist_ptr="*i32", out_ptr="*i64"), {**radix, "PASSES": passes},
                    launch))
    return out


def main(argv=None) -> int:
    only = (argv if argv is not None else sys.argv[1:])
    print(f"triton {triton.__version__}, target sm_90a, shared memory limit {SMEM_LIMIT // 1024} KB per block",
          flush=True)
    for name, fn, types, consts, cfg in cases():
        if only and not any(o in name for o in only):
            continue
        try:
            print(f"{name:72s} {report(fn, types, consts, cfg['num_warps'], cfg['num_stages'])}", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"{name:72s} FAILED {type(err).__name__}: {err}"[:400], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
