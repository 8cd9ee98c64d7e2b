"""Trial: sparse MLA (absorbed mode) written in Gluon, so that each warpgroup computes different numbers.

Triton's one-pass kernel (dslib/kernels/sparse_mla.py) gives both warpgroups of a 64-head tile the same score
rows, so the q·k product runs twice. Gluon (triton.experimental.gluon, Triton >= 3.6) lets the kernel name the
layout of every tensor, so here both products use warps [4, 2]:

    scores  s = q · [c | k_rope]ᵀ   [64 heads, BN keys]   warpgroup 0 takes keys 0..BN/2, warpgroup 1 the rest
    values  o += p · c              [64 heads, 512]       warpgroup 0 takes value columns 0..255, 1 the rest

The row max and sum of the softmax then cross the two warpgroups (the compiler reduces through shared memory),
and p moves into the operand layout of the second product (each warpgroup needs all BN keys of p). The gather
is cp.async into NUM_BUF shared buffers: block j+1's rows are in flight while block j computes.

    python benchmarks/gluon_sparse_mla_trial.py --compile-only   # offline sm_90a compile (no GPU)
    python benchmarks/gluon_sparse_mla_trial.py --out DIR        # on a Hopper GPU: check, then time

Measured (data/gpu_kernels/gluon_trial_h100.csv: one NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0,
2026-12-07, at commit d964162; no H200 came that day). Every mode matches fp32 PyTorch (relative error 1.7e-3 to
1.9e-3) and the one-pass output (within 8.0e-4) early (-1 slots) and late in the context. T = 2048, k = 2048:

    BLOCK_N 64, NUM_BUF 2, plain   3.316 ms, 352.3 TFLOP/s at 128K   against one-pass 4.612 ms, 253.3 TFLOP/s
                                   3.260 ms, 358.4 TFLOP/s at 16K    against one-pass 4.407 ms, 265.1 TFLOP/s

so 1.39x faster than the shipped kernel at 128K and 1.35x at 16K. DEFER is slower (3.70 ms at 128K), and
BLOCK_N 32 at best ties one-pass (plain 4.63 ms, OVERLAP 4.71-4.74, DEFER 5.57).
Its plain mode is now dslib's `sparse_mla(variant="gluon")` (dslib/kernels/sparse_mla_gluon.py, with batches
and any k); this file keeps the other modes. Not yet run on an H200. Offline sm_90a compile with Triton 3.6
(`--compile-only`):

    BLOCK_N  NUM_BUF  mode      shared memory  registers  spills
    64       2        plain     220 KB         218        0
    64       2        DEFER     220 KB         255        0
    32       3        plain     184 KB         202        0
    32       3        DEFER     184 KB         212        0
    32       2        plain     148 KB         202        0
    32       3        OVERLAP   184 KB         254        0
    32       4        OVERLAP   220 KB         249        0

DEFER: block j - 1's weighted sum stays in flight behind block j's scores. OVERLAP: block j + 1's scores run on
the tensor cores during block j's softmax (FlashAttention-3's in-warpgroup pipelining). The GPU run compares each
with the shipped one-pass kernel on the same card (T = 2048 queries at 128K and 16K, k = 2048) and writes
gluon_trial.csv. Gluon has no interpreter, so a kernel like this can be checked only on the GPU.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the gather and the barrier under either Triton's names (dslib's kernel is this file's plain mode)
from dslib.kernels.sparse_mla_gluon import _barrier, _gather_rows  # noqa: E402


@gluon.jit
def _softmax_pv(s, sel_row, start, S, qk_scale, m_i, l_i, acc, kc, BLOCK_N: gl.constexpr, mma_s: gl.constexpr,
                mma_o: gl.constexpr, p_op: gl.constexpr):
    """Online softmax of one block of scores s [BH, BN] (layout mma_s) and the weighted sum's wgmma, issued
    asynchronously: returns m_i, l_i and the in-flight accumulator."""
    idx = gl.load(sel_row + start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_s)))
    valid = (idx >= 0) & (idx < S)
    s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_ref)
    p = gl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, mma_o))[:, None]
    p_bf = gl.convert_layout(p.to(gl.bfloat16), p_op)
    acc = warpgroup_mma(p_bf, kc, acc, is_async=True)
    return m_new, l_i, acc


@gluon.jit
def _gl_sparse_mla_kernel(qc_ptr, qr_ptr, kv_ptr, kr_ptr, sel_ptr, out_ptr,
                          S, H, TOPK, qk_scale,
                          s_qct, s_qch, s_qrt, s_qrh, s_kvs, s_krs, s_selt, s_ot, s_oh,
                          C: gl.constexpr, R: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                          NUM_BUF: gl.constexpr, DEFER: gl.constexpr, OVERLAP: gl.constexpr,
                          num_warps: gl.constexpr):
    """q_absorbed [T, H, C], q_rope [T, H, R], cache rows kv [S, C] / k_rope [S, R], selected [T, TOPK] int32
    (TOPK a multiple of BLOCK_N) -> out [T, H, C] bf16. Grid: T · H / BLOCK_H programs, head block fastest."""
    gl.static_assert(num_warps == 8)
    pid = gl.program_id(0)
    n_hb = H // BLOCK_H
    hb = pid % n_hb
    t = (pid // n_hb).to(gl.int64)

    ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[8, 1],
                                        order=[1, 0])
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                    instr_shape=[16, BLOCK_N // 2, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                    instr_shape=[16, C // 2, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    offs_h = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
    offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, ld))
    offs_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld))
    qc = gl.load(qc_ptr + t * s_qct + offs_h[:, None] * s_qch + offs_c[None, :])
    qr = gl.load(qr_ptr + t * s_qrt + offs_h[:, None] * s_qrh + offs_r[None, :])
    qc_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, C], sl, qc)
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], sl, qr)
    kc_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, C], sl)
    kr_smem = gl.allocate_shared_memory(gl.bfloat16, [NUM_BUF, BLOCK_N, R], sl)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma_s))
    l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, mma_s))
    acc = gl.zeros([BLOCK_H, C], gl.float32, layout=mma_o)
    if DEFER:  # acc stays an in-flight wgmma result from one step to the next
        acc = warpgroup_mma_init(acc)
    s_zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=mma_s)

    sel_row = sel_ptr + t * s_selt
    n_blocks = TOPK // BLOCK_N
    for b in gl.static_range(NUM_BUF - 1):  # prologue: blocks 0 .. NUM_BUF - 2 in flight
        if b < n_blocks:
            _gather_rows(kc_smem.index(b), kr_smem.index(b), kv_ptr, kr_ptr, sel_row, b * BLOCK_N, S, s_kvs, s_krs,
                         BLOCK_N, C, R, ld)
        cp.commit_group()
    if OVERLAP:
        # the scores of block j + 1 run on the tensor cores while the softmax of block j runs on the ALUs
        # (NUM_BUF >= 3: block j feeds the weighted sum, j + 1 the scores, j + 2 is in flight)
        gl.static_assert(NUM_BUF >= 3)
        cp.wait_group(NUM_BUF - 2)
        _barrier()
        fence_async_shared()
        s_cur = warpgroup_mma(qc_smem, kc_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma(qr_smem, kr_smem.index(0).permute((1, 0)), s_cur, is_async=True)
        s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur, ))
        for j in range(n_blocks):
            cp.wait_group(NUM_BUF - 3)  # block j + 1 has landed (this thread's rows)
            _barrier()  # everyone's; and both warpgroups are done with block j - 1's weighted sum
            fence_async_shared()
            nxt = j + NUM_BUF - 1
            if nxt < n_blocks:
                _gather_rows(kc_smem.index(nxt % NUM_BUF), kr_smem.index(nxt % NUM_BUF), kv_ptr, kr_ptr, sel_row,
                             nxt * BLOCK_N, S, s_kvs, s_krs, BLOCK_N, C, R, ld)
            cp.commit_group()
            # block j + 1's scores (after the last block: a stale buffer, computed and dropped)
            nb = (j + 1) % NUM_BUF
            s_nxt = warpgroup_mma(qc_smem, kc_smem.index(nb).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s_nxt = warpgroup_mma(qr_smem, kr_smem.index(nb).permute((1, 0)), s_nxt, is_async=True)
            m_i, l_i, acc = _softmax_pv(s_cur, sel_row, j * BLOCK_N, S, qk_scale, m_i, l_i, acc,
                                        kc_smem.index(j % NUM_BUF), BLOCK_N, mma_s, mma_o, p_op)
            acc, s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_nxt))
    else:
        for j in range(n_blocks):
            buf = j % NUM_BUF
            cp.wait_group(NUM_BUF - 2)  # this thread's rows of block j have landed
            _barrier()  # everyone's have; and every warp is done with block j - 1 (the buffer refilled next)
            fence_async_shared()  # make them visible to the tensor cores (async proxy)
            nxt = j + NUM_BUF - 1
            kc = kc_smem.index(buf)
            kr = kr_smem.index(buf)
            if not DEFER:
                if nxt < n_blocks:
                    _gather_rows(kc_smem.index(nxt % NUM_BUF), kr_smem.index(nxt % NUM_BUF), kv_ptr, kr_ptr, sel_row,
                                 nxt * BLOCK_N, S, s_kvs, s_krs, BLOCK_N, C, R, ld)
                cp.commit_group()
            s = warpgroup_mma(qc_smem, kc.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(qr_smem, kr.permute((1, 0)), s, is_async=True)
            if DEFER:
                # the weighted sum of block j - 1 ran behind these scores on the tensor cores; once both warpgroups
                # have it, its buffer takes block j + NUM_BUF - 1
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                _barrier()
                if nxt < n_blocks:
                    _gather_rows(kc_smem.index(nxt % NUM_BUF), kr_smem.index(nxt % NUM_BUF), kv_ptr, kr_ptr, sel_row,
                                 nxt * BLOCK_N, S, s_kvs, s_krs, BLOCK_N, C, R, ld)
                cp.commit_group()
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

            m_i, l_i, acc = _softmax_pv(s, sel_row, j * BLOCK_N, S, qk_scale, m_i, l_i, acc, kc, BLOCK_N, mma_s,
                                        mma_o, p_op)
            if not DEFER:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, mma_o))
    out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
    offs_ho = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, mma_o))
    offs_co = gl.arange(0, C, layout=gl.SliceLayout(0, mma_o))
    gl.store(out_ptr + t * s_ot + offs_ho[:, None] * s_oh + offs_co[None, :], out.to(gl.bfloat16))


CONFIGS = [dict(BLOCK_N=64, NUM_BUF=2, DEFER=False), dict(BLOCK_N=64, NUM_BUF=2, DEFER=True),
           dict(BLOCK_N=32, NUM_BUF=3, DEFER=False), dict(BLOCK_N=32, NUM_BUF=3, DEFER=True),
           dict(BLOCK_N=32, NUM_BUF=2, DEFER=False), dict(BLOCK_N=32, NUM_BUF=3, OVERLAP=True),
           dict(BLOCK_N=32, NUM_BUF=4, OVERLAP=True)]


def gl_sparse_mla(qa, qr, kv, kr, sel, scale, *, BLOCK_H=64, BLOCK_N=64, NUM_BUF=2, DEFER=False,
                  OVERLAP=False):
    """qa [T, H, C], qr [T, H, R], kv [S, C], kr [S, R] (unit last stride), sel [T, k] int32 -> [T, H, C]."""
    T, H, C = qa.shape
    R = qr.shape[-1]
    S = kv.shape[0]
    k = sel.shape[-1]
    if H % BLOCK_H or k % BLOCK_N:
        raise ValueError(f"gl_sparse_mla: H = {H} must be a multiple of {BLOCK_H}, k = {k} of {BLOCK_N}")
    if qa.dtype != torch.bfloat16 or any(x.stride(-1) != 1 for x in (qa, qr, kv, kr, sel)):
        raise ValueError("gl_sparse_mla: bf16 inputs with unit last stride only")
    if S * max(kv.stride(0), kr.stride(0)) >= 2**31:
        raise ValueError(f"gl_sparse_mla: the gather uses 32-bit row offsets; S = {S} rows of stride "
                         f"{kv.stride(0)} do not fit")
    out = torch.empty(T, H, C, dtype=qa.dtype, device=qa.device)
    grid = (T * (H // BLOCK_H),)
    _gl_sparse_mla_kernel[grid](qa, qr, kv, kr, sel, out, S, H, k, scale * 1.4426950408889634,
                                qa.stride(0), qa.stride(1), qr.stride(0), qr.stride(1), kv.stride(0), kr.stride(0),
                                sel.stride(0), out.stride(0), out.stride(1),
                                C=C, R=R, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NUM_BUF=NUM_BUF, DEFER=DEFER,
                                OVERLAP=OVERLAP, num_warps=8)
    return out


def compile_only(BLOCK_N=64, NUM_BUF=2, DEFER=False, OVERLAP=False) -> dict:
    """Offline sm_90a compile: shared memory, registers, spills (benchmarks/kernel_resources.py's report)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kernel_resources import report

    consts = dict(C=512, R=64, BLOCK_H=64, BLOCK_N=BLOCK_N, NUM_BUF=NUM_BUF, DEFER=DEFER, OVERLAP=OVERLAP,
                  num_warps=8)
    res = report(_gl_sparse_mla_kernel, {"sel_ptr": "*i32", "qk_scale": "fp32"}, consts, num_warps=8, num_stages=1)
    return dict(BLOCK_N=BLOCK_N, NUM_BUF=NUM_BUF, DEFER=DEFER, OVERLAP=OVERLAP, **res)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.compile_only:
        for cfg in CONFIGS:
            print(compile_only(**cfg), flush=True)
        return
    run_gpu(args.out)


def run_gpu(out_dir: Path | None) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_kernels import strided_selection

    from dslib.kernels import sparse_mla as kmla
    from dslib.sparse import sparse_attention

    dev = torch.device("cuda")
    H, C, R, k = 128, 512, 64, 2048
    scale = (128 + 64) ** -0.5
    one_pass = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2)  # the tuned one-pass tile (H100 and H200)
    rows, info = [], dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          date=datetime.date.today().isoformat())
    print(info, flush=True)

    def write(rows):  # after every row, so a run cut off by its time limit still brings its figures back
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(key for r in rows for key in r))
        with open(out_dir / "gluon_trial.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def inputs(T, S, pos, seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        qa = torch.randn(T, H, C, generator=g, device=dev, dtype=torch.bfloat16)
        qr = torch.randn(T, H, R, generator=g, device=dev, dtype=torch.bfloat16)
        cache = torch.randn(S, C + R, generator=g, device=dev, dtype=torch.bfloat16)
        return qa, qr, cache[:, :C], cache[:, C:], strided_selection(pos, k, 1, seed)[0]

    # correctness: early rows (p < k: dense selections with -1 slots) and late rows, against fp32 PyTorch and the
    # one-pass Triton kernel
    for T, S, start in ((256, 4096, 0), (256, 16384, 16384 - 256)):
        pos = torch.arange(start, start + T, device=dev)
        qa, qr, kv, kr, sel = inputs(T, S, pos, seed=1)
        n = 32
        ref = sparse_attention(qa[None, :n].float(), qr[None, :n].float(), kv[None].float(), kr[None].float(),
                               sel[None, :n].long(), scale)[0]
        ref = torch.nan_to_num(ref, nan=0.0)
        base = kmla.sparse_mla(qa[None], qr[None], kv[None], kr[None], sel[None], scale, config=one_pass,
                               variant="one_pass")[0]
        for cfg in CONFIGS:
            try:
                got = gl_sparse_mla(qa, qr, kv, kr, sel, scale, **cfg)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (report and go on)
                print(f"check T={T} S={S} start={start} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append(dict(kind="check", shape=f"T={T} S={S} start={start}", config=str(cfg), ok=False,
                                 error=f"{type(e).__name__}: {str(e)[:200]}", **info))
                continue
            err_ref = ((got[:n].float() - ref).norm() / ref.norm()).item()
            err_base = ((got.float() - base.float()).norm() / base.float().norm()).item()
            ok = err_ref < 2e-2 and err_base < 2e-2 and bool(torch.isfinite(got).all())
            print(f"check T={T} S={S} start={start} {cfg}: rel err vs fp32 {err_ref:.2e}, vs one_pass "
                  f"{err_base:.2e}, {'ok' if ok else 'FAIL'}", flush=True)
            rows.append(dict(kind="check", shape=f"T={T} S={S} start={start}", config=str(cfg), ok=ok,
                             rel_err=f"{err_ref:.2e}", rel_err_one_pass=f"{err_base:.2e}", **info))
            write(rows)
        base_err = ((base[:n].float() - ref).norm() / ref.norm()).item()
        print(f"  one_pass vs fp32: {base_err:.2e}", flush=True)

    # timing: T = 2048 queries at the end of the context, as gpu_kernels.py's tuning case
    for S in (131072, 16384):
        T = 2048
        pos = torch.arange(S - T, S, device=dev)
        qa, qr, kv, kr, sel = inputs(T, S, pos, seed=2)
        flops = 2.0 * H * (2 * C + R) * int((sel >= 0).sum())
        cands = [("one_pass (Triton)", one_pass, lambda: kmla.sparse_mla(
            qa[None], qr[None], kv[None], kr[None], sel[None], scale, config=one_pass, variant="one_pass"))]
        cands += [(f"gluon {cfg}", cfg, (lambda cfg=cfg: gl_sparse_mla(qa, qr, kv, kr, sel, scale, **cfg)))
                  for cfg in CONFIGS]
        for name, _cfg, fn in cands:
            try:
                med, lo, hi = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.1, 0.9])
                err = ""
            except Exception as e:  # noqa: BLE001  (report and go on)
                med = lo = hi = float("nan")
                err = f"{type(e).__name__}: {str(e)[:200]}"
            tf = flops / (med * 1e-3) / 1e12
            print(f"time T={T} S={S} {name}: {med:.3f} ms ({lo:.3f}-{hi:.3f}), {tf:.1f} TFLOP/s {err}", flush=True)
            rows.append(dict(kind="time", shape=f"T={T} S={S} k={k}", config=name, ok=not err, median_ms=f"{med:.4f}",
                             lo_ms=f"{lo:.4f}", hi_ms=f"{hi:.4f}", tflops=f"{tf:.1f}", error=err, **info))
            write(rows)
    write(rows)


if __name__ == "__main__":
    main()
