"""DSA's attention kernels on one GPU at the 671B dims: correctness, a small tile sweep, timings against dense.

What it measures (one layer's attention core; projections are the same for dense and sparse and are left out):

  checks    the Triton kernels against dslib's PyTorch path at full width (H = 128, C = 512, R = 64, indexer
            64 heads × 128, k = 2048): indexer scores (bf16, FP8), top-k (same keys except ties), sparse MLA and
            dense absorbed decode (relative error against an fp32 reference, next to the PyTorch bf16 path's)
  tuning    a few tile configurations per kernel, each checked against PyTorch on a slice; the fastest correct
            one is used for the rest of the run (all rows land in gpu_kernels_tuning.csv)
  prefill   causal prefill of L tokens (batch 1): the indexer alone (bf16, FP8), index_topk (indexer + top-k),
            sparse MLA over a selection, the DSA core (FP8 index_topk + sparse MLA), and dense attention as
            cuDNN SDPA in MHA mode (backend pinned, output checked for NaN)
  decode    one new token per sequence over S cached tokens: the indexer, index_topk, sparse MLA, the DSA step,
            and dense absorbed decode (our split-KV kernel, and the best PyTorch path found), eager and as a
            CUDA graph

Every row has the device, torch/triton versions and the date; TFLOP/s and GB/s are printed against the H200's
ceilings (REFERENCE.md §8: bf16 ~790 TFLOP/s measured, FP8 1,979 datasheet, 4.3 TB/s measured copy).
Times: triton.testing.do_bench medians (L2 flushed between runs; 10th/90th percentiles as the spread) for
runs under 40 ms, CUDA-event medians of 3-5 runs (min/max as the spread) for longer ones; always after a
warm-up call that also compiles.

    python benchmarks/gpu_kernels.py --out data/gpu_kernels            # one H200, about 5-6 minutes
    python benchmarks/gpu_kernels.py --quick --out /tmp/gk             # smoke run, < 90 s
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --dry-run --out /tmp/gk   # the logic on CPU, tiny dims
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402

from dslib import indexer as torch_indexer  # noqa: E402
from dslib.kernels import indexer as kidx  # noqa: E402
from dslib.kernels import sparse_mla as kmla  # noqa: E402
from dslib.sparse import dense_masked_attention, sparse_attention, topk_selection  # noqa: E402

CEILING = {"bf16_tflops": 790.0, "fp8_tflops": 1979.0, "hbm_gbps": 4300.0}  # REFERENCE.md §8.4
FULL_DIMS = dict(H=128, C=512, R=64, HI=64, DI=128, topk=2048, d_qk=192, d_v=128)
TINY_DIMS = dict(H=20, C=32, R=16, HI=4, DI=32, topk=16, d_qk=24, d_v=16)
BF16_TOL = 1e-2  # relative Frobenius error of a bf16 kernel against an fp32 reference

SIZES = {
    "full": dict(prefill=[131072, 65536, 32768, 16384, 8192, 4096], topk_variants=[32768, 131072],
                 decode_len=131072, decode_batch=[1, 16, 32], check_len=8192, check_rows=1024,
                 budget_s=320),
    "quick": dict(prefill=[16384, 4096], topk_variants=[16384], decode_len=32768, decode_batch=[1, 32],
                  check_len=4096, check_rows=256, budget_s=85),
    "dry": dict(prefill=[96, 48], topk_variants=[96], decode_len=80, decode_batch=[1, 3], check_len=64,
                check_rows=24, budget_s=900),
}
# Candidate tiles. Hopper: 228 KB shared memory and 64K registers per SM; tl.dot tiles >= 16.
SWEEP = {
    "index_prefill": [dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                      dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
                      dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                      dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3)],
    "index_decode": [dict(BLOCK_N=128, num_warps=4, num_stages=1), dict(BLOCK_N=64, num_warps=4, num_stages=1),
                     dict(BLOCK_N=256, num_warps=8, num_stages=1)],
    # sparse / dense MLA: 64 heads × BLOCK_N keys, 8 warps (the fp32 accumulator [64, 512] takes 128 registers
    # per thread); shared memory ~ q 72 KB + 2 stages of BLOCK_N × 576 × 2 B (offline sm_90a compile: 64 keys
    # 217 KB, 32 keys 145 KB; 255 registers with small spills)
    "sparse": [dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3),
               dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
               dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=2),
               dict(BLOCK_H=64, BLOCK_N=16, num_warps=8, num_stages=3)],
    "dense_decode": [dict(BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3),
                     dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2),
                     dict(BLOCK_H=64, BLOCK_N=16, num_warps=8, num_stages=3)],
}
TINY_SWEEP = {"index_prefill": [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)],
              "index_decode": [dict(BLOCK_N=16, num_warps=4, num_stages=1)],
              "sparse": [dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)],
              "dense_decode": [dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)]}


# ------------------------------------------------------------------------------------------------ bookkeeping
class Run:
    """Rows of every CSV, flushed after each section; the wall-clock budget; the chosen configurations."""

    def __init__(self, out: Path, mode: str, device: torch.device, dims: dict, budget_s: float):
        self.out, self.mode, self.device, self.dims = out, mode, device, dims
        self.deadline = time.perf_counter() + budget_s
        self.rows = {"gpu_kernels.csv": [], "gpu_kernels_checks.csv": [], "gpu_kernels_tuning.csv": []}
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
        self.env = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                        python=platform.python_version(), date=datetime.date.today().isoformat(), mode=mode)
        self.best = {"index_prefill_bf16": None, "index_prefill_fp8": None, "index_decode_bf16": None,
                     "index_decode_fp8": None, "sparse_prefill": None, "sparse_decode": None, "dense_decode": None}
        self.summary: list[str] = []
        self.goals: dict = {}  # ("prefill", L) / ("decode", B): dense/DSA ratio; ("sparse_pct", L): % of bf16 peak

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, file: str, **row) -> None:
        self.rows[file].append({**row, **self.env})

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for file, rows in self.rows.items():
            if not rows:
                continue
            keys = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            with open(self.out / file, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn, run: Run, *, long_ms: float = 40.0) -> dict:
    """Median time of fn() in ms with its spread, after a compiling warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = (time.perf_counter() - t0) * 1e3
    if run.device.type != "cuda":  # dry run: wall clock
        return dict(median_ms=first, lo_ms=first, hi_ms=first, reps=1, timer="perf_counter")
    if first < long_ms:
        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.1, 0.9])
        return dict(median_ms=med, lo_ms=lo, hi_ms=hi, reps="do_bench", timer="do_bench p50 (p10, p90)")
    reps = 3 if first > 400 else 5
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return dict(median_ms=statistics.median(times), lo_ms=min(times), hi_ms=max(times), reps=reps,
                timer="cuda events median (min, max)")


def as_graph(fn, run: Run):
    """fn captured as a CUDA graph (decode: removes the launch gaps of the ~10 small kernels of a step)."""
    if run.device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def record(run: Run, section: str, variant: str, *, L: int, batch: int, t: dict, flops: float | None = None,
           nbytes: float | None = None, peak: str = "bf16", note: str = "") -> dict:
    row = dict(section=section, variant=variant, context=L, batch=batch, median_ms=round(t["median_ms"], 4),
               lo_ms=round(t["lo_ms"], 4), hi_ms=round(t["hi_ms"], 4), reps=t["reps"], timer=t["timer"], note=note)
    sec = t["median_ms"] / 1e3
    parts = []
    if flops:
        tf = flops / sec / 1e12
        ceiling = CEILING["fp8_tflops" if peak == "fp8" else "bf16_tflops"]
        row.update(tflop=round(flops / 1e12, 4), tflops=round(tf, 1), pct_of_peak=round(100 * tf / ceiling, 1),
                   peak=peak)
        parts.append(f"{tf:7.1f} TFLOP/s ({100 * tf / ceiling:4.1f}% of {peak} {ceiling:.0f})")
    if nbytes:
        gbps = nbytes / sec / 1e9
        row.update(gbytes=round(nbytes / 1e9, 4), gbps=round(gbps, 1),
                   pct_of_hbm=round(100 * gbps / CEILING["hbm_gbps"], 1))
        parts.append(f"{gbps:7.0f} GB/s ({100 * gbps / CEILING['hbm_gbps']:4.1f}% of 4300)")
    run.add("gpu_kernels.csv", **row)
    spread = f"[{t['lo_ms']:.3f}, {t['hi_ms']:.3f}]"
    print(f"  {section:8s} {variant:26s} L={L:>7d} B={batch:>2d} {t['median_ms']:10.3f} ms {spread:>22s} "
          + "  ".join(parts) + (f"  {note}" if note else ""), flush=True)
    return row


def guarded(run: Run, name: str, fn, *args, min_left: float = 5.0):
    """Run one section; a failure is printed and recorded, and the next section still runs."""
    if run.left() < min_left:
        print(f"\n== {name}: skipped (time budget spent)", flush=True)
        run.add("gpu_kernels_checks.csv", check=name, ok="skipped", detail="time budget spent")
        run.flush()
        return None
    print(f"\n== {name} ({run.left():.0f} s left)", flush=True)
    t0 = time.perf_counter()
    try:
        return fn(run, *args)
    except Exception as err:  # noqa: BLE001 - one failing section must not lose the others
        traceback.print_exc()
        run.add("gpu_kernels_checks.csv", check=name, ok="error", detail=f"{type(err).__name__}: {err}"[:500])
        return None
    finally:
        free()
        run.flush()
        print(f"   ({name}: {time.perf_counter() - t0:.1f} s)", flush=True)


# ------------------------------------------------------------------------------------------------ inputs
def rnd(*shape, dtype=torch.bfloat16, device, scale=1.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)


def indexer_inputs(run: Run, B: int, T: int, S: int, seed=0):
    """q [B,T,64,128] bf16, w [B,T,64] fp32 (with the model's 1/sqrt(64·128) folded in), k [B,S,128] bf16."""
    d = run.dims
    dev = run.device
    q = rnd(B, T, d["HI"], d["DI"], device=dev, seed=seed)
    w = rnd(B, T, d["HI"], dtype=torch.float32, device=dev, seed=seed + 1, scale=(d["HI"] * d["DI"]) ** -0.5)
    k = rnd(B, S, d["DI"], device=dev, seed=seed + 2)
    return q, w, k


def mla_inputs(run: Run, B: int, T: int, S: int, seed=0, *, with_cache=False):
    """q_absorbed [B,T,H,C], q_rope [B,T,H,R] and one cache tensor [B,S,C+R] (FlashMLA's layout) viewed as
    kv_latent [B,S,C] and k_rope [B,S,R]; bf16. with_cache: also return the [B,S,C+R] tensor."""
    d = run.dims
    dev = run.device
    qa = rnd(B, T, d["H"], d["C"], device=dev, seed=seed)
    qr = rnd(B, T, d["H"], d["R"], device=dev, seed=seed + 1)
    cache = rnd(B, S, d["C"] + d["R"], device=dev, seed=seed + 2)
    views = (qa, qr, cache[..., : d["C"]], cache[..., d["C"]:])
    return (*views, cache) if with_cache else views


def strided_selection(pos: torch.Tensor, k: int, B: int, seed=0) -> torch.Tensor:
    """[B, T, k] int32: for a query at position p >= k, one random key in each of k equal strata of 0..p
    (spread over the whole context, like an indexer's choice on random data); for p < k, keys 0..p, then -1."""
    g = torch.Generator(device=pos.device).manual_seed(seed)
    T = pos.shape[-1]
    j = torch.arange(k, device=pos.device, dtype=torch.float32)
    u = torch.rand(B, T, k, generator=g, device=pos.device)
    p1 = (pos.float() + 1).view(1, T, 1)
    sel = torch.floor((j + u) * p1 / k).long().clamp(max=pos.view(1, T, 1).expand(B, T, k))
    short = pos.view(1, T, 1) < k
    dense = torch.where(j.long().view(1, 1, k) <= pos.view(1, T, 1), j.long().view(1, 1, k), -1)
    return torch.where(short, dense, sel).to(torch.int32)


def causal_pairs(pos: torch.Tensor, S: int | None = None, k: int | None = None) -> int:
    n = pos.long() + 1
    if S is not None:
        n = n.clamp(max=S)
    if k is not None:
        n = n.clamp(max=k)
    return int(n.sum())


def indexer_flops(run: Run, pairs: int) -> float:
    return 2.0 * run.dims["HI"] * run.dims["DI"] * pairs


def mla_flops(run: Run, pairs: int) -> float:  # absorbed: 2·H·(C+R) scores + 2·H·C weighted sum per pair
    d = run.dims
    return 2.0 * d["H"] * (2 * d["C"] + d["R"]) * pairs


def mha_flops(run: Run, pairs: int) -> float:
    d = run.dims
    return 2.0 * d["H"] * (d["d_qk"] + d["d_v"]) * pairs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def scores_only(q, w, k, pos, *, fp8: bool, config, chunk=4096):
    """The indexer's work in index_topk (same chunks, same causal key bounds) without the top-k: the kernel's
    own time. Quantisation of q and k for FP8 included (k pre-quantised if given as (k8, scale))."""
    k_scale = None
    if isinstance(k, tuple):
        k, k_scale = k
    B, T = q.shape[:2]
    S = k.shape[1]
    q, w, k, k_scale, FP8 = kidx._prepare(q, w, k, k_scale, fp8, False)
    decode = T <= kidx.DECODE_MAX_QUERIES
    last = [S - 1] * len(range(0, T, chunk)) if decode else [min(S - 1, int(pos[0, min(T, s + chunk) - 1]))
                                                               for s in range(0, T, chunk)]
    buf = torch.empty(B * min(chunk, T) * S, dtype=torch.float32, device=q.device)
    for start, lp in zip(range(0, T, chunk), last):
        rows, n = min(chunk, T - start), lp + 1
        sl = slice(start, start + rows)
        kidx._launch_scores(q[:, sl], w[:, sl], k, k_scale, pos[:, sl], buf[: B * rows * n].view(B, rows, n), FP8,
                            decode, config)
    return buf


# ------------------------------------------------------------------------------------------------ checks
def check(run: Run, name: str, ok: bool, **detail) -> None:
    run.add("gpu_kernels_checks.csv", check=name, ok="pass" if ok else "FAIL",
            detail="; ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items()))
    run.summary.append(f"{'pass' if ok else 'FAIL'}  {name}: {detail}")
    print(f"  {'pass' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def topk_agreement(sel: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor) -> dict:
    """How two selections from (nearly) the same scores agree: share of rows with the same key set, share of
    keys in common, and whether `sel` is a valid top-k of `scores` up to rounding: the sorted scores of its
    keys equal the reference's (largest difference, relative to the largest |score|)."""
    a, b = sel.long().sort(-1).values, ref.long().sort(-1).values
    same_rows = float((a == b).all(-1).float().mean())
    valid = (ref >= 0).sum(-1)
    same_count = bool(torch.equal((sel >= 0).sum(-1), valid))
    # keys in common: for each row, |A ∩ B| / |B| (via a mask over the key axis)
    S = scores.shape[-1]
    ma = torch.zeros(*sel.shape[:2], S + 1, dtype=torch.bool, device=sel.device)
    mb = torch.zeros_like(ma)
    ma.scatter_(-1, torch.where(sel < 0, S, sel.long()), True)
    mb.scatter_(-1, torch.where(ref < 0, S, ref.long()), True)
    common = float((ma & mb)[..., :S].sum() / mb[..., :S].sum().clamp(min=1))
    take = lambda s: scores.gather(-1, s.long().clamp(min=0)).masked_fill(s < 0, float("-inf")).sort(-1).values  # noqa: E731
    va, vb = take(sel), take(ref)
    fin = torch.isfinite(vb)
    finite_match = bool(torch.equal(torch.isfinite(va), fin))
    top = scores[torch.isfinite(scores)].abs().max().clamp(min=1e-30)
    gap = float(((va - vb).abs()[fin]).max() / top) if fin.any() else 0.0
    return dict(same_rows=same_rows, common_keys=common, same_counts=same_count and finite_match, score_gap=gap)


def section_checks(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    S, T = sz["check_len"], sz["check_rows"]
    with torch.no_grad():
        # --- indexer scores and top-k: T queries at the end of an S-token context, plus the decode kernel
        q, w, k = indexer_inputs(run, 1, T, S, seed=11)
        pos = torch.arange(S - T, S, device=dev)
        ref = torch_indexer.index_scores(q, w, k, pos)  # fp32 maths on the bf16 values
        out = kidx.index_scores(q, w, k, pos, config=run.best["index_prefill_bf16"])
        fin = torch.isfinite(ref)
        err = rel_err(out[fin], ref[fin])
        check(run, "indexer bf16 scores vs torch fp32", err < 1e-4 and torch.equal(torch.isinf(out), ~fin), rel_err=err)
        out8 = kidx.index_scores(q, w, k, pos, fp8=True, config=run.best["index_prefill_fp8"])
        sim = torch_indexer.fp8_index_scores(q, w, k, pos, rotate=False)
        err_sim, err_exact = rel_err(out8[fin], sim[fin]), rel_err(out8[fin], ref[fin])
        check(run, "indexer fp8 scores vs torch simulated fp8", err_sim < 1e-4, rel_err=err_sim,
              rel_err_vs_exact=err_exact)
        del out, out8
        topk = min(d["topk"], S // 2)
        sel = kidx.index_topk(q, w, k, pos, topk, config=run.best["index_prefill_bf16"])
        ref_sel = topk_selection(ref, topk, pos)
        agree = topk_agreement(sel, ref_sel, ref)
        check(run, "index_topk bf16 vs topk_selection (equal except ties)",
              agree["same_counts"] and agree["score_gap"] < 1e-5, **agree)
        sel16 = kidx.index_topk(q, w, k, pos, topk, score_dtype=torch.bfloat16, config=run.best["index_prefill_bf16"])
        agree = topk_agreement(sel16, ref_sel, ref)
        check(run, "index_topk bf16 with bf16 scores (rounded scores: near-ties may swap)",
              agree["same_counts"] and agree["score_gap"] < 1e-2, **agree)
        sel8 = kidx.index_topk(q, w, k, pos, topk, fp8=True, config=run.best["index_prefill_fp8"])
        agree = topk_agreement(sel8, topk_selection(sim, topk, pos), sim)
        check(run, "index_topk fp8 vs topk_selection(fp8_index_scores)", agree["same_counts"]
              and agree["score_gap"] < 1e-4, **agree)
        agree = topk_agreement(sel8, ref_sel, ref)
        check(run, "index_topk fp8 vs exact selection (information: FP8's effect)", True, **agree)
        del q, w, k, ref, sim, sel, sel16, sel8, ref_sel
        free()
        Bd = 4
        q, w, k = indexer_inputs(run, Bd, 1, S, seed=12)
        pos1 = torch.tensor([[S - 1], [S // 2], [S - 7], [topk // 2]], device=dev)[:Bd]
        ref = torch_indexer.index_scores(q, w, k, pos1)
        sel = kidx.index_topk(q, w, k, pos1, topk, config=run.best["index_decode_bf16"])
        agree = topk_agreement(sel, topk_selection(ref, topk, pos1), ref)
        check(run, "index_topk decode (T=1, B=4) vs topk_selection", agree["same_counts"]
              and agree["score_gap"] < 1e-5, **agree)
        del q, w, k, ref, sel
        free()

        # --- sparse MLA: prefill rows (some with fewer than k visible keys) and split-KV decode
        Ts = min(T, 256)
        qa, qr, lat, kr = mla_inputs(run, 1, Ts, S, seed=13)
        pos = torch.cat([torch.arange(Ts // 4, device=dev) * 7, torch.arange(S - (Ts - Ts // 4), S, device=dev)])
        sel = strided_selection(pos, d["topk"], 1, seed=3)
        scale = d["d_qk"] ** -0.5
        x = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=run.best["sparse_prefill"])
        ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel.long(), scale, chunk=64)
        ref16 = sparse_attention(qa, qr, lat, kr, sel.long(), scale, chunk=64)
        e_k, e_t = rel_err(x, ref32), rel_err(ref16, ref32)
        check(run, f"sparse_mla prefill bf16 vs fp32 reference (tol {BF16_TOL:g}, <= 1.5x torch bf16)",
              bool(torch.isfinite(x).all()) and e_k < BF16_TOL and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k,
              torch_bf16_rel_err=e_t)
        del x, ref32, ref16
        Bd = 8
        qa, qr, lat, kr = mla_inputs(run, Bd, 1, S, seed=14)
        pos1 = (S - 1 - torch.arange(Bd, device=dev) * (S // (2 * Bd))).view(Bd, 1)
        sel = torch.cat([strided_selection(pos1[b], d["topk"], 1, seed=b) for b in range(Bd)])
        x = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=run.best["sparse_decode"])
        ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel.long(), scale)
        ref16 = sparse_attention(qa, qr, lat, kr, sel.long(), scale)
        e_k, e_t = rel_err(x, ref32), rel_err(ref16, ref32)
        check(run, "sparse_mla decode (B=8, split-KV) vs fp32 reference", bool(torch.isfinite(x).all())
              and e_k < BF16_TOL and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k, torch_bf16_rel_err=e_t)

        # --- dense absorbed decode
        x = kmla.dense_mla(qa, qr, lat, kr, pos1, scale, config=run.best["dense_decode"])
        allowed = torch.arange(S, device=dev).view(1, 1, S) <= pos1.view(Bd, 1, 1)
        ref32 = dense_masked_attention(qa.float(), qr.float(), lat.float(), kr.float(), allowed, scale)
        ref16 = dense_masked_attention(qa, qr, lat, kr, allowed, scale)
        e_k, e_t = rel_err(x, ref32), rel_err(ref16, ref32)
        check(run, "dense_mla decode (B=8) vs fp32 reference", bool(torch.isfinite(x).all()) and e_k < BF16_TOL
              and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k, torch_bf16_rel_err=e_t)


# ------------------------------------------------------------------------------------------------ tuning
def sweep(run: Run, kernel: str, configs, fn_of_config, verify, flops: float | None, nbytes: float | None,
          peak: str, shape: str):
    """Time fn(config) for each config whose output passes verify(out) -> (ok, err); return the fastest."""
    best, best_ms = None, math.inf
    for cfg in configs:
        if run.left() < 20:
            print("  (sweep cut short: time budget)", flush=True)
            break
        row = dict(kernel=kernel, shape=shape, config=str(cfg))
        try:
            out = fn_of_config(cfg)
            sync()
            ok, err = verify(out)
            del out
            row.update(ok=ok, rel_err=f"{err:.3g}")
            if ok:
                t = measure(lambda cfg=cfg: fn_of_config(cfg), run)
                row.update(median_ms=round(t["median_ms"], 4), lo_ms=round(t["lo_ms"], 4), hi_ms=round(t["hi_ms"], 4))
                sec = t["median_ms"] / 1e3
                if flops:
                    row["tflops"] = round(flops / sec / 1e12, 1)
                if nbytes:
                    row["gbps"] = round(nbytes / sec / 1e9, 1)
                if t["median_ms"] < best_ms:
                    best, best_ms = cfg, t["median_ms"]
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for this tile
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
        run.add("gpu_kernels_tuning.csv", **row)
        print(f"  {kernel:18s} {str(cfg):70s} " + (f"{row['median_ms']:9.3f} ms  " if "median_ms" in row else "")
              + (f"{row.get('tflops', '')} TFLOP/s " if "tflops" in row else "")
              + (f"{row.get('gbps', '')} GB/s " if "gbps" in row else "")
              + ("" if row.get("ok") else f"REJECTED {row.get('error', row.get('rel_err'))}"), flush=True)
        free()
    print(f"  -> {kernel}: {best}", flush=True)
    return best


def section_tuning(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    cands = {"full": SWEEP, "dry": TINY_SWEEP}.get(run.mode) or {key: value[:1] for key, value in SWEEP.items()}
    with torch.no_grad():
        # indexer prefill: one 4,096-row chunk late in a 16K context (dry: tiny)
        S = 16384 if run.mode != "dry" else 96
        T = min(4096, S // 4)
        q, w, k = indexer_inputs(run, 1, T, S, seed=21)
        pos = torch.arange(S - T, S, device=dev)
        rows = min(T, 128)
        ref = torch_indexer.index_scores(q[:, :rows], w[:, :rows], k, pos[:rows])
        ref8 = torch_indexer.fp8_index_scores(q[:, :rows], w[:, :rows], k, pos[:rows], rotate=False)
        fin = torch.isfinite(ref)
        fl = indexer_flops(run, causal_pairs(pos))
        for fp8, name, reference in ((False, "bf16", ref), (True, "fp8", ref8)):
            def fn(cfg, fp8=fp8):
                return kidx.index_scores(q, w, k, pos, fp8=fp8, config=cfg)

            def verify(out, reference=reference):
                e = rel_err(out[:, :rows][fin], reference[fin])
                return e < 1e-4, e

            run.best[f"index_prefill_{name}"] = sweep(run, f"index_prefill_{name}", cands["index_prefill"], fn, verify,
                                                      fl, None, "fp8" if fp8 else "bf16", f"T={T} S={S}")
        del q, w, k, ref, ref8
        free()

        # indexer decode: B = 32 (dry: 3) single queries over the whole cache
        B, S = sz["decode_batch"][-1], sz["decode_len"]
        q, w, k = indexer_inputs(run, B, 1, S, seed=22)
        pos1 = torch.full((B, 1), S - 1, device=dev)
        ref = torch_indexer.index_scores(q[:2], w[:2], k[:2], pos1[:2])
        k8, ks = kidx.quantize_fp8(k)
        ref8 = torch_indexer.fp8_index_scores(q[:2], w[:2], k[:2], pos1[:2], rotate=False)
        for name, keys, reference in (("bf16", k, ref), ("fp8", (k8, ks), ref8)):
            def fn(cfg, keys=keys):
                if isinstance(keys, tuple):
                    return kidx.index_scores(q, w, keys[0], pos1, k_scale=keys[1], config=cfg)
                return kidx.index_scores(q, w, keys, pos1, config=cfg)

            def verify(out, reference=reference):
                e = rel_err(out[:2], reference)
                return e < 1e-4, e

            nbytes = B * S * (d["DI"] * (1 if name == "fp8" else 2) + (4 if name == "fp8" else 0) + 4)
            run.best[f"index_decode_{name}"] = sweep(run, f"index_decode_{name}", cands["index_decode"], fn, verify,
                                                     None, nbytes, "bf16", f"B={B} T=1 S={S}")
        del q, w, k, k8, ks, ref, ref8
        free()

        # sparse MLA prefill: 4,096 queries late in a 16K context (dry: tiny), strided random selection
        S = 16384 if run.mode != "dry" else 96
        T = min(4096, S // 4)
        qa, qr, lat, kr = mla_inputs(run, 1, T, S, seed=23)
        pos = torch.arange(S - T, S, device=dev)
        sel = strided_selection(pos, d["topk"], 1, seed=4)
        scale = d["d_qk"] ** -0.5
        rows = min(T, 32)
        ref = sparse_attention(qa[:, :rows].float(), qr[:, :rows].float(), lat.float(), kr.float(),
                               sel[:, :rows].long(), scale)
        fl = mla_flops(run, causal_pairs(pos, k=d["topk"]))

        def fn(cfg):
            return kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=cfg)

        def verify(out):
            e = rel_err(out[:, :rows], ref)
            return e < BF16_TOL, e

        run.best["sparse_prefill"] = sweep(run, "sparse_prefill", cands["sparse"], fn, verify, fl, None, "bf16",
                                           f"T={T} S={S} k={d['topk']}")
        del qa, qr, lat, kr, sel, ref
        free()

        # sparse MLA decode (split-KV) and dense decode: B = 32 over the whole cache
        B, S = sz["decode_batch"][-1], sz["decode_len"]
        qa, qr, lat, kr = mla_inputs(run, B, 1, S, seed=24)
        pos1 = torch.full((B, 1), S - 1, device=dev)
        sel = torch.cat([strided_selection(pos1[b], d["topk"], 1, seed=b) for b in range(B)])
        ref = sparse_attention(qa[:2].float(), qr[:2].float(), lat[:2].float(), kr[:2].float(), sel[:2].long(), scale)

        def fn(cfg):
            return kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=cfg)

        def verify(out):
            e = rel_err(out[:2], ref)
            return e < BF16_TOL, e

        fl = mla_flops(run, B * min(d["topk"], S))
        run.best["sparse_decode"] = sweep(run, "sparse_decode", cands["sparse"], fn, verify, fl, None, "bf16",
                                          f"B={B} T=1 S={S} k={d['topk']}")
        allowed = torch.ones(2, 1, S, dtype=torch.bool, device=dev)
        ref_dense = dense_masked_attention(qa[:2].float(), qr[:2].float(), lat[:2].float(), kr[:2].float(), allowed,
                                           scale)

        def fn(cfg):
            return kmla.dense_mla(qa, qr, lat, kr, pos1, scale, config=cfg)

        def verify(out):
            e = rel_err(out[:2], ref_dense)
            return e < BF16_TOL, e

        fl = mla_flops(run, B * S)
        nbytes = B * S * (d["C"] + d["R"]) * 2
        run.best["dense_decode"] = sweep(run, "dense_decode", cands["dense_decode"], fn, verify, fl, nbytes, "bf16",
                                         f"B={B} T=1 S={S}")
    print(f"  chosen: {run.best}", flush=True)


# ------------------------------------------------------------------------------------------------ prefill
def dense_prefill(run: Run, L: int):
    """cuDNN SDPA in MHA mode (per-head q/k 192, v 128; causal), backend pinned: the fastest dense option
    measured on the H200. Falls back to V zero-padded to 192 if cuDNN refuses unequal head dims."""
    d, dev = run.dims, run.device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
    q = rnd(1, d["H"], L, d["d_qk"], device=dev, seed=31)
    k = rnd(1, d["H"], L, d["d_qk"], device=dev, seed=32)
    v = rnd(1, d["H"], L, d["d_v"], device=dev, seed=33)
    scale = d["d_qk"] ** -0.5
    variants = [("cudnn_sdpa", v), ("cudnn_sdpa_vpad192", F.pad(v, (0, d["d_qk"] - d["d_v"])))]
    for name, vv in variants:
        try:
            with sdpa_kernel([backend]):
                def fn(vv=vv):
                    return F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)

                out = fn()
                sync()
                if not torch.isfinite(out).all():
                    raise RuntimeError("non-finite output")
                del out
                t = measure(fn, run)
            return name, t
        except Exception as err:  # noqa: BLE001
            print(f"  dense {name} at L={L} failed: {type(err).__name__}: {err}"[:300], flush=True)
            free()
    return None, None


def section_prefill(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    scale = d["d_qk"] ** -0.5
    bi, b8, bs = run.best["index_prefill_bf16"], run.best["index_prefill_fp8"], run.best["sparse_prefill"]
    for L in sz["prefill"]:
        if run.left() < 15:
            print(f"  L={L}: skipped (time budget)", flush=True)
            run.add("gpu_kernels_checks.csv", check=f"prefill L={L}", ok="skipped", detail="time budget spent")
            continue
        times = {}
        try:
            with torch.no_grad():
                pos = torch.arange(L, device=dev)
                pos2 = pos.view(1, L)
                q, w, k = indexer_inputs(run, 1, L, L, seed=L)
                fl_idx = indexer_flops(run, causal_pairs(pos))
                t = measure(lambda: scores_only(q, w, k, pos2, fp8=False, config=bi), run)
                record(run, "prefill", "indexer_bf16", L=L, batch=1, t=t, flops=fl_idx, peak="bf16")
                t = measure(lambda: scores_only(q, w, k, pos2, fp8=True, config=b8), run)
                record(run, "prefill", "indexer_fp8(+quant)", L=L, batch=1, t=t, flops=fl_idx, peak="fp8")
                t = measure(lambda: kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, config=b8), run)
                times["index_topk"] = t["median_ms"]
                record(run, "prefill", "index_topk_fp8", L=L, batch=1, t=t, flops=fl_idx, peak="fp8",
                       note="indexer + torch.topk fp32 sorted")
                if L in sz["topk_variants"]:
                    for name, kw in (("index_topk_fp8_bf16scores", dict(score_dtype=torch.bfloat16)),
                                     ("index_topk_fp8_unsorted", dict(sorted=False)),
                                     ("index_topk_bf16", dict(fp8=False))):
                        kw = {"fp8": True, **kw}
                        cfg = b8 if kw["fp8"] else bi
                        t = measure(lambda kw=kw, cfg=cfg: kidx.index_topk(q, w, k, pos, d["topk"], config=cfg, **kw),
                                    run)
                        record(run, "prefill", name, L=L, batch=1, t=t, flops=fl_idx,
                               peak="fp8" if kw["fp8"] else "bf16")
                    chunk_rows = min(4096, L)
                    x = torch.randn(1, chunk_rows, L, device=dev)
                    for dt in (torch.float32, torch.bfloat16):
                        xx = x.to(dt)
                        t = measure(lambda xx=xx: torch.topk(xx, min(d["topk"], L), dim=-1), run)
                        record(run, "prefill", f"torch.topk_{str(dt)[6:]}", L=L, batch=1, t=t,
                               nbytes=xx.numel() * xx.element_size(),
                               note=f"one [{chunk_rows}, {L}] chunk, k={min(d['topk'], L)}")
                    del x, xx
                sel = kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, config=b8)
                qa, qr, lat, kr = mla_inputs(run, 1, L, L, seed=L + 1)
                fl_mla = mla_flops(run, causal_pairs(pos, k=d["topk"]))
                t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=bs), run)
                times["sparse"] = t["median_ms"]
                row = record(run, "prefill", "sparse_mla(indexer sel)", L=L, batch=1, t=t, flops=fl_mla, peak="bf16")
                run.goals[("sparse_pct", L)] = row.get("pct_of_peak")
                sel_r = strided_selection(pos, d["topk"], 1, seed=5)
                t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel_r, scale, config=bs), run)
                record(run, "prefill", "sparse_mla(strided sel)", L=L, batch=1, t=t, flops=fl_mla, peak="bf16")
                del sel_r

                def dsa():  # the attention does not need the indices in score order: unsorted top-k
                    s = kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False, config=b8)
                    return kmla.sparse_mla(qa, qr, lat, kr, s, scale, config=bs)

                out = dsa()
                if not torch.isfinite(out).all():
                    raise RuntimeError(f"DSA core output not finite at L={L}")
                del out, sel
                t = measure(dsa, run)
                times["dsa"] = t["median_ms"]
                record(run, "prefill", "dsa_core(fp8 idx+topk+sparse)", L=L, batch=1, t=t,
                       flops=fl_idx / 2 + fl_mla, peak="bf16",
                       note="fp32 scores, unsorted top-k; FLOPs: FP8 indexer counted at half")

                def dsa_bf16():  # top-k over bf16-rounded scores: half the top-k traffic, near-ties may swap
                    s = kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False,
                                        score_dtype=torch.bfloat16, config=b8)
                    return kmla.sparse_mla(qa, qr, lat, kr, s, scale, config=bs)

                t = measure(dsa_bf16, run)
                times["dsa_bf16"] = t["median_ms"]
                record(run, "prefill", "dsa_core(bf16 scores)", L=L, batch=1, t=t, flops=fl_idx / 2 + fl_mla,
                       peak="bf16", note="bf16 scores, unsorted top-k")
                del q, w, k, qa, qr, lat, kr
                free()
                name, t = dense_prefill(run, L)
                if t is not None:
                    times["dense"] = t["median_ms"]
                    record(run, "prefill", f"dense_{name}", L=L, batch=1, t=t, flops=mha_flops(run, causal_pairs(pos)),
                           peak="bf16")
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at one size: the next size still runs
            traceback.print_exc()
            run.add("gpu_kernels_checks.csv", check=f"prefill L={L}", ok="error",
                    detail=f"{type(err).__name__}: {err}"[:500])
        finally:
            free()
            run.flush()
        if "dsa" in times and "dense" in times:
            ratio = times["dense"] / times["dsa"]
            run.goals[("prefill", L)] = ratio
            alt = f"; with bf16 scores {times['dense'] / times['dsa_bf16']:.2f}x" if "dsa_bf16" in times else ""
            line = (f"prefill L={L:>6d}: DSA core {times['dsa']:9.2f} ms (index_topk {times['index_topk']:.2f}, "
                    f"sparse {times['sparse']:.2f}) vs dense cuDNN {times['dense']:9.2f} ms -> {ratio:5.2f}x{alt}")
            run.summary.append(line)
            print("  " + line, flush=True)
            run.add("gpu_kernels.csv", section="prefill", variant="ratio dense/dsa", context=L, batch=1,
                    median_ms="", note=f"{ratio:.3f}")


# ------------------------------------------------------------------------------------------------ decode
def torch_dense_decode(qa, qr, cache, scale, C):
    """Absorbed decode in PyTorch, as lean as it gets: the scale folded into q, one bmm over the 576-wide cache
    for the scores, softmax read in bf16 and computed in fp32, one bmm with the cache's first C columns.
    qa [B,1,H,C], qr [B,1,H,R], cache [B,S,C+R] -> [B,1,H,C]."""
    q = torch.cat([qa, qr], dim=-1)[:, 0] * scale  # [B, H, C+R]
    scores = torch.bmm(q, cache.transpose(1, 2))  # [B, H, S] bf16
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(cache.dtype)
    return torch.bmm(p, cache[..., :C]).unsqueeze(1)


def sdpa_mqa_decode(qa, qr, cache, scale, C):
    """The same as one MQA call of SDPA: the H heads become H query rows of a single head."""
    q = torch.cat([qa, qr], dim=-1).transpose(1, 2)  # [B, 1, H, C+R]
    kv = cache.unsqueeze(1)  # [B, 1, S, C+R]
    return F.scaled_dot_product_attention(q, kv, kv[..., :C], scale=scale).transpose(1, 2)


def section_decode(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    S = sz["decode_len"]
    scale = d["d_qk"] ** -0.5
    bi, b8 = run.best["index_decode_bf16"], run.best["index_decode_fp8"]
    bs, bd = run.best["sparse_decode"], run.best["dense_decode"]
    for B in sz["decode_batch"]:
        if run.left() < 10:
            print(f"  B={B}: skipped (time budget)", flush=True)
            continue
        best = {}
        try:
            with torch.no_grad():
                pos1 = torch.full((B, 1), S - 1, device=dev)
                q, w, k = indexer_inputs(run, B, 1, S, seed=40 + B)
                k8, ks = kidx.quantize_fp8(k)  # the deployed cache keeps indexer keys in FP8 with a scale per key
                qa, qr, lat, kr, cache = mla_inputs(run, B, 1, S, seed=50 + B, with_cache=True)
                fl_idx = indexer_flops(run, B * S)
                t = measure(lambda: kidx.index_scores(q, w, k, pos1, config=bi), run)
                record(run, "decode", "indexer_bf16", L=S, batch=B, t=t, nbytes=B * S * d["DI"] * 2, flops=fl_idx)
                t = measure(lambda: kidx.index_scores(q, w, k8, pos1, k_scale=ks, config=b8), run)
                record(run, "decode", "indexer_fp8", L=S, batch=B, t=t, nbytes=B * S * (d["DI"] + 4), flops=fl_idx,
                       peak="fp8")
                t = measure(lambda: kidx.index_topk(q, w, k8, pos1, d["topk"], k_scale=ks, config=b8), run)
                record(run, "decode", "index_topk_fp8", L=S, batch=B, t=t, nbytes=B * S * (d["DI"] + 4))
                sel = kidx.index_topk(q, w, k8, pos1, d["topk"], k_scale=ks, config=b8)
                fl_sp = mla_flops(run, B * min(S, d["topk"]))
                by_sp = B * min(S, d["topk"]) * (d["C"] + d["R"]) * 2
                t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, config=bs), run)
                record(run, "decode", "sparse_mla", L=S, batch=B, t=t, flops=fl_sp, nbytes=by_sp)

                def dsa_step(keys=(k8, ks)):
                    s = kidx.index_topk(q, w, keys[0], pos1, d["topk"], k_scale=keys[1],
                                        config=b8 if keys[1] is not None else bi)
                    return kmla.sparse_mla(qa, qr, lat, kr, s, scale, config=bs)

                for name, fn in (("dsa_step_fp8keys", dsa_step), ("dsa_step_bf16keys", lambda: dsa_step((k, None)))):
                    t = measure(fn, run)
                    best[name] = t["median_ms"]
                    record(run, "decode", name, L=S, batch=B, t=t, note="index_topk + sparse_mla, eager")
                    try:
                        g = as_graph(fn, run)
                        if g is not None:
                            t = measure(g, run)
                            best[name + "_graph"] = t["median_ms"]
                            record(run, "decode", name + "_graph", L=S, batch=B, t=t, note="CUDA graph")
                    except Exception as err:  # noqa: BLE001
                        print(f"  CUDA graph of {name} failed: {type(err).__name__}: {err}"[:300], flush=True)
                del q, w, k, k8, ks, sel
                free()

                fl_dense = mla_flops(run, B * S)
                by_dense = B * S * (d["C"] + d["R"]) * 2
                dense_fns = {"dense_mla_triton": lambda: kmla.dense_mla(qa, qr, lat, kr, pos1, scale, config=bd),
                             "dense_torch_bmm": lambda: torch_dense_decode(qa, qr, cache, scale, d["C"])}
                if dev.type == "cuda":
                    dense_fns["dense_sdpa_mqa"] = lambda: sdpa_mqa_decode(qa, qr, cache, scale, d["C"])
                ref = None
                for name, fn in dense_fns.items():
                    try:
                        out = fn()
                        if ref is None:
                            ref = out
                        else:
                            e = rel_err(out, ref)
                            if not (e < 2 * BF16_TOL):
                                raise RuntimeError(f"differs from dense_mla_triton: rel err {e:.3g}")
                        del out
                        t = measure(fn, run)
                        best[name] = t["median_ms"]
                        record(run, "decode", name, L=S, batch=B, t=t, flops=fl_dense, nbytes=by_dense)
                        g = as_graph(fn, run) if name == "dense_mla_triton" else None
                        if g is not None:
                            t = measure(g, run)
                            best[name + "_graph"] = t["median_ms"]
                            record(run, "decode", name + "_graph", L=S, batch=B, t=t, flops=fl_dense,
                                   nbytes=by_dense, note="CUDA graph")
                    except Exception as err:  # noqa: BLE001
                        print(f"  {name} B={B}: {type(err).__name__}: {err}"[:300], flush=True)
                        free()
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            run.add("gpu_kernels_checks.csv", check=f"decode B={B}", ok="error",
                    detail=f"{type(err).__name__}: {err}"[:500])
        finally:
            free()
            run.flush()
        dense = {n: v for n, v in best.items() if n.startswith("dense")}
        dsa = {n: v for n, v in best.items() if n.startswith("dsa")}
        if dense and dsa:
            dn, dv = min(dense.items(), key=lambda kv: kv[1])
            sn, sv = min(dsa.items(), key=lambda kv: kv[1])
            run.goals[("decode", B)] = dv / sv
            line = (f"decode B={B:>2d} S={S}: DSA {sv:.3f} ms ({sn}) vs best dense {dv:.3f} ms ({dn}) -> "
                    f"{dv / sv:.2f}x")
            run.summary.append(line)
            print("  " + line, flush=True)
            run.add("gpu_kernels.csv", section="decode", variant="ratio best dense/best dsa", context=S, batch=B,
                    median_ms="", note=f"{dv / sv:.3f} ({dn} / {sn})")


# ------------------------------------------------------------------------------------------------ main
def goal_lines(run: Run) -> list[str]:
    """The issue's goals against what this run measured (ratios are dense time / DSA time)."""
    g, out = run.goals, []
    big = max([L for kind, L in g if kind == "prefill"], default=None)
    if big is not None:
        out.append(f"goal prefill {big}: DSA core >= 3x faster than cuDNN dense: {g[('prefill', big)]:.2f}x "
                   + ("MET" if g[("prefill", big)] >= 3 else "not met"))
    long = sorted(L for kind, L in g if kind == "prefill" and L >= 16384)
    if long:
        worst = min(g[("prefill", L)] for L in long)
        out.append(f"goal DSA faster than dense from 16K on ({', '.join(str(L) for L in long)}): worst "
                   f"{worst:.2f}x " + ("MET" if worst > 1 else "not met"))
    pct = [(L, v) for (kind, L), v in g.items() if kind == "sparse_pct" and v is not None]
    if pct:
        L, v = max(pct)
        out.append(f"goal sparse attention >= 50% of bf16 peak at {L} prefill: {v:.1f}% "
                   + ("MET" if v >= 50 else "not met"))
    dec = [(B, v) for (kind, B), v in g.items() if kind == "decode"]
    if dec:
        B, v = max(dec)
        out.append(f"goal decode batch {B}: DSA >= 6x faster than the best dense absorbed decode: {v:.2f}x "
                   + ("MET" if v >= 6 else "not met"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the CSVs")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, default tiles only (< 90 s)")
    ap.add_argument("--dry-run", action="store_true", help="tiny dims on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (default per mode)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: checks,tuning,prefill,decode")
    args = ap.parse_args(argv)
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    if mode != "dry" and not torch.cuda.is_available():
        print("No CUDA device: run on a GPU, or use --dry-run under TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if mode != "dry" else "cpu")
    run = Run(args.out, mode, device, TINY_DIMS if mode == "dry" else FULL_DIMS,
              args.budget_s or SIZES[mode]["budget_s"])
    print(f"{run.env}\ndims {run.dims}\nceilings {CEILING}", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    if "tuning" not in skip:
        guarded(run, "tuning", section_tuning)
    if "checks" not in skip:
        guarded(run, "checks", section_checks)
    if "decode" not in skip:
        guarded(run, "decode", section_decode)
    if "prefill" not in skip:  # largest size first: the headline numbers survive a short budget
        guarded(run, "prefill", section_prefill)
    run.flush()
    print(f"\n== summary ({time.perf_counter() - t0:.0f} s, {run.env['device']}, torch {run.env['torch']}, "
          f"triton {run.env['triton']})")
    for line in run.summary:
        print("  " + line)
    for line in goal_lines(run):
        print("  " + line)
    print(f"  tiles used: {run.best}")
    print(f"CSVs in {args.out}: " + ", ".join(f for f, rows in run.rows.items() if rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
