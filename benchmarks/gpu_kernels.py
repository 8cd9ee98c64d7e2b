"""DSA's attention kernels on one GPU at the 671B dims: correctness, a tile/variant sweep, timings against dense.

What it measures (one layer's attention core; projections are the same for dense and sparse and are left out),
the goal sizes first so that a short budget cuts the curves, not them:

  tuning    per kernel a few tiles and variants (sparse / dense MLA: the one-pass online softmax and the two-pass
            softmax; top-k: torch.topk or radix select, fp32 or bf16 scores), each checked against PyTorch on a
            slice; the fastest correct one is used for the rest of the run (all rows: gpu_kernels_tuning.csv)
  checks    the chosen kernels against dslib's PyTorch path at full width (H = 128, C = 512, R = 64, indexer 64
            heads × 128, k = 2048): indexer scores (bf16 exact; FP8 by DeepGEMM's cosine criterion), top-k (same
            keys except ties / near-ties), sparse MLA and dense absorbed decode, both variants (relative error
            against an fp32 reference, next to the PyTorch bf16 path's)
  decode    one new token per sequence over 131,072 cached tokens, batch 32, 16, 1: the indexer, index_topk,
            sparse MLA, the DSA step (eager and as a CUDA graph), and dense absorbed decode (our kernels, old and
            new variant, and the best PyTorch path found)
  prefill   causal prefill of L = 128K, 64K, ... 8K tokens (batch 1): the indexer (bf16, FP8), index_topk,
            sparse MLA over a selection, the DSA core (FP8 index_topk + sparse MLA) with the chosen variants and
            with the first version's (one-pass, torch.topk fp32), dense attention as cuDNN SDPA (MHA mode,
            backend pinned), and at 16K / 8K the DSA core on dslib's PyTorch path

Every row has the device, torch/triton versions and the date; TFLOP/s and GB/s are printed against the H200's
ceilings (REFERENCE.md §8: bf16 ~790 TFLOP/s measured, FP8 1,979 datasheet, 4.3 TB/s measured copy).
Times: triton.testing.do_bench medians (L2 flushed between runs; 10th/90th percentiles as the spread) for
runs under 40 ms, CUDA-event medians of 2-4 runs (min/max as the spread) for longer ones; always after a
warm-up call that also compiles.

    python benchmarks/gpu_kernels.py --out data/gpu_kernels      # one H200: 145 s budget, ~2.6 min wall
    python benchmarks/gpu_kernels.py --quick --out /tmp/gk                   # smoke run, < 90 s
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --dry-run --out /tmp/gk   # the logic on CPU, tiny dims

Writes gpu_kernels.csv (timings), gpu_kernels_checks.csv, gpu_kernels_tuning.csv and gpu_kernels_best.json (the
configurations chosen: candidates for the library defaults) under --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
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
from dslib.kernels import topk as ktopk  # noqa: E402
from dslib.sparse import dense_masked_attention, sparse_attention, topk_selection  # noqa: E402

CEILING = {"bf16_tflops": 790.0, "fp8_tflops": 1979.0, "hbm_gbps": 4300.0}  # REFERENCE.md §8.4
FULL_DIMS = dict(H=128, C=512, R=64, HI=64, DI=128, topk=2048, d_qk=192, d_v=128)
TINY_DIMS = dict(H=20, C=32, R=16, HI=4, DI=32, topk=16, d_qk=24, d_v=16)
BF16_TOL = 1e-2  # relative Frobenius error of a bf16 kernel against an fp32 reference
FP8_COS_TOL = 1e-3  # DeepGEMM's test criterion for FP8 logits: 1 - 2·Σxy / Σ(x² + y²)
NEAR_TIE = 2.0**-8  # selections from two roundings of the same scores: their sorted scores may differ by one bf16
#                     ulp of the largest score (rounding moves each score by at most half an ulp of its own size)
CHECKS_RESERVE_S = 15.0  # of the budget, kept for the full-width checks at the end
FIELDS = {"gpu_kernels.csv": ("section", "variant", "context", "batch", "median_ms", "lo_ms", "hi_ms", "reps", "timer",
                              "note", "tflop", "tflops", "pct_of_peak", "peak", "gbytes", "gbps", "pct_of_hbm"),
          "gpu_kernels_checks.csv": ("check", "ok", "detail"),
          "gpu_kernels_tuning.csv": ("kernel", "shape", "config", "ok", "rel_err", "median_ms", "lo_ms", "hi_ms",
                                     "tflops", "gbps", "error")}

SIZES = {
    "full": dict(prefill=[131072, 65536, 32768, 16384, 8192], torch_path=[16384, 8192], decode_len=131072,
                 decode_batch=[32, 16, 1], check_len=8192, check_rows=1024, tune_ctx=131072, tune_rows=2048,
                 topk_tune=(4096, 65536), budget_s=145),
    "quick": dict(prefill=[16384, 4096], torch_path=[4096], decode_len=32768, decode_batch=[32, 1],
                  check_len=4096, check_rows=256, tune_ctx=16384, tune_rows=1024, topk_tune=(1024, 16384),
                  budget_s=85),
    "dry": dict(prefill=[96, 48], torch_path=[48], decode_len=80, decode_batch=[3, 1], check_len=64, check_rows=24,
                tune_ctx=96, tune_rows=24, topk_tune=(24, 96), budget_s=900),
}


def two_pass(block_n, score_h, score_stages, value_h, value_c, value_stages, chunk=4096, warps=8):
    return dict(variant="two_pass", BLOCK_N=block_n, SCORE_BLOCK_H=score_h, SCORE_WARPS=warps,
                SCORE_STAGES=score_stages, VALUE_BLOCK_H=value_h, VALUE_BLOCK_C=value_c, VALUE_WARPS=warps,
                VALUE_STAGES=value_stages, CHUNK=chunk)


def one_pass(block_h, block_n, warps, stages):
    return dict(variant="one_pass", BLOCK_H=block_h, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


# Candidates. Hopper: 227 KB shared memory per block, 64K registers per SM; tl.dot tiles >= 16. Resources from an
# offline sm_90a compile (benchmarks/kernel_resources.py): one-pass 64 × 32 keys 145 KB / 239-255 registers;
# two-pass scores 64 heads × 64 keys 224 KB / 204, 128 heads × 32 keys 224 KB / 128, 64 × 32 149 KB / 170;
# values 64 heads × 512 columns 136 KB / 255 (4 B spill), 128 × 256 × 32 keys 41 KB / 230.
TWO_PASS_A = two_pass(64, 64, 2, 64, 512, 2)  # = kmla.TWO_PASS_CONFIG
TWO_PASS_B = two_pass(32, 128, 2, 128, 256, 3)
TWO_PASS_C = two_pass(32, 64, 3, 64, 512, 3)
GLUON = dict(variant="gluon")
SWEEP = {
    "index_prefill_fp8": [dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                          dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                          dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3)],
    "index_prefill_bf16": [dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                           dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)],
    "index_decode": [dict(BLOCK_N=128, num_warps=4, num_stages=1), dict(BLOCK_N=256, num_warps=8, num_stages=1)],
    # most promising first (a tight budget cuts the sweep after TUNING_SHARE of it); the first version's tiles
    # are measured in any case (the before / after rows reuse its compiled kernel)
    # gluon: dslib/kernels/sparse_mla_gluon.py, fixed tiles, Hopper only (rejected elsewhere)
    "sparse_prefill": [GLUON, one_pass(64, 64, 8, 2), TWO_PASS_A, one_pass(64, 32, 8, 3), TWO_PASS_B,
                       {**TWO_PASS_A, "CHUNK": 512}, TWO_PASS_C],
    "sparse_decode": [TWO_PASS_A, one_pass(64, 32, 8, 3), TWO_PASS_B],
    "dense_decode": [TWO_PASS_A, one_pass(64, 32, 8, 3), TWO_PASS_B, one_pass(64, 64, 8, 2)],
}
TUNING_SHARE = 0.45  # of the budget: later candidates of a sweep are skipped once tuning has used this much
TINY_TWO_PASS = dict(variant="two_pass", BLOCK_N=16, SCORE_BLOCK_H=16, SCORE_WARPS=4, SCORE_STAGES=1,
                     VALUE_BLOCK_H=16, VALUE_BLOCK_C=16, VALUE_WARPS=4, VALUE_STAGES=1, CHUNK=8)
TINY_SWEEP = {"index_prefill_fp8": [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)],
              "index_prefill_bf16": [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)],
              "index_decode": [dict(BLOCK_N=16, num_warps=4, num_stages=1)],
              "sparse_prefill": [one_pass(16, 16, 4, 1), TINY_TWO_PASS],
              "sparse_decode": [one_pass(16, 16, 4, 1), TINY_TWO_PASS],
              "dense_decode": [one_pass(16, 16, 4, 1), TINY_TWO_PASS]}
TINY_RADIX = dict(BLOCK=32, num_warps=4)
# top-k candidates: (method, score dtype); "torch fp32" is the first version's choice
TOPK_CANDIDATES = [("torch", torch.float32), ("torch", torch.bfloat16), ("radix", torch.float32),
                   ("radix", torch.bfloat16)]
OLD = {"topk": ("torch", torch.float32), "sparse": one_pass(64, 32, 8, 3), "dense": one_pass(64, 32, 8, 3)}


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
                     "index_decode_fp8": None, "sparse_prefill": None, "sparse_decode": None, "dense_decode": None,
                     "topk_prefill": OLD["topk"], "topk_decode": OLD["topk"]}
        self.radix = TINY_RADIX if mode == "dry" else None  # radix_topk tiles (None: the library's)
        self.reserve = 0.0  # seconds kept back for the checks at the end
        self.tune_until = time.perf_counter() + TUNING_SHARE * budget_s
        self.summary: list[str] = []
        self.goals: dict = {}  # ("prefill", L) / ("decode", B): dense/DSA ratio; ("sparse_pct", L): % of bf16 peak

    def left(self) -> float:
        """Seconds of the budget left for what runs now (less the time kept for the final checks)."""
        return self.deadline - time.perf_counter() - self.reserve

    def add(self, file: str, **row) -> None:
        self.rows[file].append({**row, **self.env})

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for file, rows in self.rows.items():
            if not rows:
                continue
            keys = list(FIELDS[file]) + list(self.env)  # fixed columns first (notebook 06 reads these files)
            for r in rows:
                keys += [k for k in r if k not in keys]
            with open(self.out / file, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
        best = {k: (dict(method=v[0], score_dtype=str(v[1])) if k.startswith("topk") else v)
                for k, v in self.best.items()}
        (self.out / "gpu_kernels_best.json").write_text(json.dumps({"env": self.env, "best": best}, indent=1))

    def topk(self, kind: str) -> dict:
        """index_topk keyword arguments of the chosen top-k ("prefill" / "decode")."""
        method, dtype = self.best[f"topk_{kind}"]
        return dict(method=method, score_dtype=dtype, topk_config=self.radix)


def mla(cfg: dict | None) -> dict:
    """sparse_mla / dense_mla keyword arguments of a swept configuration {"variant": ..., tiles...}."""
    cfg = dict(cfg or {})
    return dict(variant=cfg.pop("variant", "one_pass"), config=cfg or None)


def label(cfg: dict | None) -> str:
    """A short name of an MLA configuration, e.g. "two_pass N64 s64 v64x512 c4096" or "one_pass h64 n32"."""
    if not cfg:
        return "default"
    if cfg.get("variant") == "gluon":
        return "gluon"
    if cfg.get("variant") == "two_pass":
        return (f"two_pass N{cfg['BLOCK_N']} s{cfg['SCORE_BLOCK_H']} v{cfg['VALUE_BLOCK_H']}x{cfg['VALUE_BLOCK_C']} "
                f"c{cfg['CHUNK']}")
    return f"one_pass h{cfg.get('BLOCK_H')} n{cfg.get('BLOCK_N')}"


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
        med, lo, hi = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.1, 0.9])
        return dict(median_ms=med, lo_ms=lo, hi_ms=hi, reps="do_bench", timer="do_bench p50 (p10, p90)")
    reps = 2 if first > 300 else 4
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
    print(f"  {section:8s} {variant:34s} L={L:>7d} B={batch:>2d} {t['median_ms']:10.3f} ms {spread:>22s} "
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
    """Seeded N(0, scale²) values; drawn in the target dtype directly (no fp32 copy of a 16 GiB tensor)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=device, dtype=dtype)
    return x.mul_(scale) if scale != 1.0 else x


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


def cos_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """DeepGEMM's similarity measure for FP8 results: 1 - 2·Σxy / Σ(x² + y²) (0 = equal; ~rel_err² / 2)."""
    a, b = a.double(), b.double()
    return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum().clamp(min=1e-300))


def scores_only(q, w, k, pos, *, fp8: bool, config, chunk=4096, score_dtype=torch.float32):
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
    buf = torch.empty(B * min(chunk, T) * S, dtype=score_dtype, device=q.device)
    for start, lp in zip(range(0, T, chunk), last):
        rows, n = min(chunk, T - start), lp + 1
        sl = slice(start, start + rows)
        kidx._launch_scores(q[:, sl], w[:, sl], k, k_scale, pos[:, sl], buf[: B * rows * n].view(B, rows, n), FP8,
                            decode, config)
    return buf


def topk_name(method: str, dtype: torch.dtype) -> str:
    return f"{method} {str(dtype).replace('torch.', '').replace('float32', 'fp32').replace('bfloat16', 'bf16')}"


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


def unique(*cfgs):
    return [c for i, c in enumerate(cfgs) if c not in cfgs[:i]]


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
        cd = cos_diff(out8[fin], sim[fin])
        check(run, f"indexer fp8 scores vs torch simulated fp8 (cosine diff < {FP8_COS_TOL:g}, DeepGEMM's test)",
              cd < FP8_COS_TOL and torch.equal(torch.isinf(out8), ~fin), cos_diff=cd,
              rel_err=rel_err(out8[fin], sim[fin]), cos_diff_vs_exact=cos_diff(out8[fin], ref[fin]))
        del out, out8
        topk = min(d["topk"], S // 2)
        ref_sel = topk_selection(ref, topk, pos)
        sel = kidx.index_topk(q, w, k, pos, topk, config=run.best["index_prefill_bf16"])
        agree = topk_agreement(sel, ref_sel, ref)
        check(run, "index_topk bf16 (torch.topk) vs topk_selection (equal except ties)",
              agree["same_counts"] and agree["score_gap"] < 1e-5, **agree)
        sel_r = kidx.index_topk(q, w, k, pos, topk, method="radix", topk_config=run.radix,
                                config=run.best["index_prefill_bf16"])
        own = topk_selection(kidx.index_scores(q, w, k, pos, config=run.best["index_prefill_bf16"]), topk, pos)
        check(run, "index_topk bf16 (radix, sorted) == topk_selection (same scores, ties to the earlier key)",
              torch.equal(sel_r, own), same_rows=float((sel_r == own).all(-1).float().mean()),
              same_rows_vs_torch_scores=float((sel_r == ref_sel).all(-1).float().mean()))
        scores16 = kidx.index_scores(q, w, k, pos, config=run.best["index_prefill_bf16"],
                                     out=torch.empty(1, T, S, dtype=torch.bfloat16, device=dev))
        sel16 = ktopk.radix_topk(scores16, topk, pos.view(1, T), config=run.radix)
        ref16 = topk_selection(scores16.float(), topk, pos)
        check(run, "radix_topk on bf16 scores == topk_selection of the same bf16 scores",
              torch.equal(sel16.sort(-1).values, ref16.sort(-1).values))
        agree = topk_agreement(sel16, ref_sel, ref)
        check(run, "radix_topk bf16 scores vs exact selection (near-ties may swap)",
              agree["same_counts"] and agree["score_gap"] < NEAR_TIE, **agree)
        sel8 = kidx.index_topk(q, w, k, pos, topk, fp8=True, config=run.best["index_prefill_fp8"])
        agree = topk_agreement(sel8, topk_selection(sim, topk, pos), sim)
        check(run, "index_topk fp8 vs topk_selection(fp8_index_scores) (near-ties may swap)", agree["same_counts"]
              and agree["score_gap"] < NEAR_TIE, **agree)
        agree = topk_agreement(sel8, ref_sel, ref)
        check(run, "index_topk fp8 vs exact selection (information: FP8's effect)", True, **agree)
        del q, w, k, ref, sim, sel, sel_r, sel16, ref16, scores16, sel8, ref_sel, own
        free()
        Bd = 4
        q, w, k = indexer_inputs(run, Bd, 1, S, seed=12)
        pos1 = torch.tensor([[S - 1], [S // 2], [S - 7], [topk // 2]], device=dev)[:Bd]
        ref = torch_indexer.index_scores(q, w, k, pos1)
        ref_sel = topk_selection(ref, topk, pos1)
        for method in ("torch", "radix"):
            sel = kidx.index_topk(q, w, k, pos1, topk, config=run.best["index_decode_bf16"], method=method,
                                  topk_config=run.radix)
            agree = topk_agreement(sel, ref_sel, ref)
            check(run, f"index_topk decode (T=1, B=4, {method}) vs topk_selection", agree["same_counts"]
                  and agree["score_gap"] < 1e-5, **agree)
        del q, w, k, ref, sel
        free()

        # --- sparse MLA: prefill rows (some with fewer than k visible keys) and split-KV decode, each variant
        Ts = min(T, 256)
        qa, qr, lat, kr = mla_inputs(run, 1, Ts, S, seed=13)
        pos = torch.cat([torch.arange(Ts // 4, device=dev) * 7, torch.arange(S - (Ts - Ts // 4), S, device=dev)])
        sel = strided_selection(pos, d["topk"], 1, seed=3)
        scale = d["d_qk"] ** -0.5
        ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel.long(), scale, chunk=64)
        e_t = rel_err(sparse_attention(qa, qr, lat, kr, sel.long(), scale, chunk=64), ref32)
        for cfg in unique(OLD["sparse"], run.best["sparse_prefill"]):
            x = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **mla(cfg))
            e_k = rel_err(x, ref32)
            check(run, f"sparse_mla prefill {label(cfg)} bf16 vs fp32 reference (tol {BF16_TOL:g}, <= 1.5x torch bf16)",
                  bool(torch.isfinite(x).all()) and e_k < BF16_TOL and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k,
                  torch_bf16_rel_err=e_t)
        del x, ref32
        Bd = 8
        qa, qr, lat, kr = mla_inputs(run, Bd, 1, S, seed=14)
        pos1 = (S - 1 - torch.arange(Bd, device=dev) * (S // (2 * Bd))).view(Bd, 1)
        sel = torch.cat([strided_selection(pos1[b], d["topk"], 1, seed=b) for b in range(Bd)])
        ref32 = sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(), sel.long(), scale)
        e_t = rel_err(sparse_attention(qa, qr, lat, kr, sel.long(), scale), ref32)
        for cfg in unique(OLD["sparse"], run.best["sparse_decode"]):
            x = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **mla(cfg))
            e_k = rel_err(x, ref32)
            check(run, f"sparse_mla decode {label(cfg)} (B=8, split-KV) vs fp32 reference",
                  bool(torch.isfinite(x).all()) and e_k < BF16_TOL and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k,
                  torch_bf16_rel_err=e_t)

        # --- dense absorbed decode
        allowed = torch.arange(S, device=dev).view(1, 1, S) <= pos1.view(Bd, 1, 1)
        ref32 = dense_masked_attention(qa.float(), qr.float(), lat.float(), kr.float(), allowed, scale)
        e_t = rel_err(dense_masked_attention(qa, qr, lat, kr, allowed, scale), ref32)
        for cfg in unique(OLD["dense"], run.best["dense_decode"]):
            x = kmla.dense_mla(qa, qr, lat, kr, pos1, scale, **mla(cfg))
            e_k = rel_err(x, ref32)
            check(run, f"dense_mla decode {label(cfg)} (B=8) vs fp32 reference", bool(torch.isfinite(x).all())
                  and e_k < BF16_TOL and e_k <= 1.5 * e_t + 1e-4, rel_err=e_k, torch_bf16_rel_err=e_t)


# ------------------------------------------------------------------------------------------------ tuning
def sweep(run: Run, kernel: str, configs, fn_of_config, verify, flops: float | None, nbytes: float | None,
          peak: str, shape: str, names=None):
    """Time fn(config) for each config whose output passes verify(out) -> (ok, err); return the fastest."""
    best, best_ms = None, math.inf
    for i, cfg in enumerate(configs):
        if best is not None and (run.left() < 25 or time.perf_counter() > run.tune_until):
            print("  (sweep cut short: time budget)", flush=True)
            run.add("gpu_kernels_tuning.csv", kernel=kernel, shape=shape, config=str(configs[i:]), ok="skipped",
                    error="time budget")
            break
        name = names[i] if names else str(cfg)
        row = dict(kernel=kernel, shape=shape, config=name)
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
                if t["median_ms"] < best_ms or run.mode == "dry":  # dry run: the last one, so every path runs
                    best, best_ms = cfg, t["median_ms"]
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for this tile
            row.update(ok=False, error=f"{type(err).__name__}: {err}"[:300])
        run.add("gpu_kernels_tuning.csv", **row)
        print(f"  {kernel:18s} {name[:84]:84s} " + (f"{row['median_ms']:9.3f} ms  " if "median_ms" in row else "")
              + (f"{row.get('tflops', '')} TFLOP/s " if "tflops" in row else "")
              + (f"{row.get('gbps', '')} GB/s " if "gbps" in row else "")
              + ("" if row.get("ok") else f"REJECTED {row.get('error', row.get('rel_err'))}"), flush=True)
        free()
    print(f"  -> {kernel}: {best if not names or best is None else names[configs.index(best)]}", flush=True)
    return best


def tune_mla(run: Run, kernel: str, configs, call, ref, rows, flops, nbytes, shape):
    """Sweep sparse/dense MLA variants and tiles: call(kw) -> out, compared with ref on the first rows."""
    def fn(cfg):
        return call(mla(cfg))

    def verify(out):
        e = rel_err(out[rows], ref)
        return e < BF16_TOL, e

    return sweep(run, kernel, configs, fn, verify, flops, nbytes, "bf16", shape)


def section_tuning(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    cands = {"full": SWEEP, "dry": TINY_SWEEP}.get(run.mode) or {key: value[:2] for key, value in SWEEP.items()}
    scale = d["d_qk"] ** -0.5
    with torch.no_grad():
        # the attention kernels first (the goals): a tight budget cuts the indexer's tile sweep instead
        # sparse MLA prefill: tune_rows queries at the end of a tune_ctx context (the cache does not fit L2 at
        # 128K), strided random selection
        S = sz["tune_ctx"]
        T = min(sz["tune_rows"], S // 4)
        qa, qr, lat, kr = mla_inputs(run, 1, T, S, seed=23)
        pos = torch.arange(S - T, S, device=dev)
        sel = strided_selection(pos, d["topk"], 1, seed=4)
        rows = min(T, 32)
        ref = sparse_attention(qa[:, :rows].float(), qr[:, :rows].float(), lat.float(), kr.float(),
                               sel[:, :rows].long(), scale)
        run.best["sparse_prefill"] = tune_mla(
            run, "sparse_prefill", cands["sparse_prefill"],
            lambda kw: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **kw), ref, (slice(None), slice(0, rows)),
            mla_flops(run, causal_pairs(pos, k=d["topk"])), None, f"T={T} S={S} k={d['topk']}")
        del qa, qr, lat, kr, sel, ref
        free()

        # sparse MLA decode (split-KV) and dense decode: B = 32 over the whole cache
        B, S = sz["decode_batch"][0], sz["decode_len"]
        qa, qr, lat, kr = mla_inputs(run, B, 1, S, seed=24)
        pos1 = torch.full((B, 1), S - 1, device=dev)
        sel = torch.cat([strided_selection(pos1[b], d["topk"], 1, seed=b) for b in range(B)])
        ref = sparse_attention(qa[:2].float(), qr[:2].float(), lat[:2].float(), kr[:2].float(), sel[:2].long(), scale)
        run.best["sparse_decode"] = tune_mla(
            run, "sparse_decode", cands["sparse_decode"], lambda kw: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **kw),
            ref, slice(0, 2), mla_flops(run, B * min(d["topk"], S)), None, f"B={B} T=1 S={S} k={d['topk']}")
        allowed = torch.ones(2, 1, S, dtype=torch.bool, device=dev)
        ref = dense_masked_attention(qa[:2].float(), qr[:2].float(), lat[:2].float(), kr[:2].float(), allowed, scale)
        run.best["dense_decode"] = tune_mla(
            run, "dense_decode", cands["dense_decode"], lambda kw: kmla.dense_mla(qa, qr, lat, kr, pos1, scale, **kw),
            ref, slice(0, 2), mla_flops(run, B * S), B * S * (d["C"] + d["R"]) * 2, f"B={B} T=1 S={S}")
        # top-k of one prefill chunk: tune_rows x topk_tune[1] scores late in the context (causal), as index_topk
        rows_t, width = sz["topk_tune"]
        q, w, k = indexer_inputs(run, 1, rows_t, width, seed=25)
        pos = torch.arange(width - rows_t, width, device=dev)
        exact = kidx.index_topk(q, w, k, pos, min(d["topk"], width), fp8=True, sorted=False,
                                config=run.best["index_prefill_fp8"])
        sc = kidx.index_scores(q, w, k, pos, fp8=True, config=run.best["index_prefill_fp8"])

        def fn(cand):
            return kidx.index_topk(q, w, k, pos, min(d["topk"], width), fp8=True, sorted=False, method=cand[0],
                                   score_dtype=cand[1], config=run.best["index_prefill_fp8"], topk_config=run.radix)

        def verify(sel):
            agree = topk_agreement(sel, exact, sc)
            return agree["same_counts"] and agree["score_gap"] < NEAR_TIE, agree["score_gap"]

        run.best["topk_prefill"] = sweep(run, "index_topk_prefill", TOPK_CANDIDATES, fn, verify,
                                         indexer_flops(run, causal_pairs(pos)), None, "fp8",
                                         f"T={rows_t} S={width} fp8 indexer + top-k",
                                         names=[topk_name(*c) for c in TOPK_CANDIDATES]) or OLD["topk"]
        del q, w, k, exact, sc
        free()

        # indexer decode: B = 32 (dry: 3) single queries over the whole cache; then the decode top-k methods
        B, S = sz["decode_batch"][0], sz["decode_len"]
        q, w, k = indexer_inputs(run, B, 1, S, seed=22)
        pos1 = torch.full((B, 1), S - 1, device=dev)
        ref = torch_indexer.index_scores(q[:2], w[:2], k[:2], pos1[:2])
        k8, ks = kidx.quantize_fp8(k)
        ref8 = torch_indexer.fp8_index_scores(q[:2], w[:2], k[:2], pos1[:2], rotate=False)
        for name, keys, reference in (("fp8", (k8, ks), ref8), ("bf16", k, ref)):
            def fn(cfg, keys=keys):
                if isinstance(keys, tuple):
                    return kidx.index_scores(q, w, keys[0], pos1, k_scale=keys[1], config=cfg)
                return kidx.index_scores(q, w, keys, pos1, config=cfg)

            def verify(out, reference=reference, name=name):
                if name == "fp8":
                    e = cos_diff(out[:2], reference)
                    return e < FP8_COS_TOL, e
                e = rel_err(out[:2], reference)
                return e < 1e-4, e

            nbytes = B * S * (d["DI"] * (1 if name == "fp8" else 2) + (4 if name == "fp8" else 0) + 4)
            run.best[f"index_decode_{name}"] = sweep(run, f"index_decode_{name}", cands["index_decode"], fn, verify,
                                                     None, nbytes, "bf16", f"B={B} T=1 S={S}")
        topk = min(d["topk"], S)
        exact = topk_selection(kidx.index_scores(q, w, k8, pos1, k_scale=ks), topk, pos1)

        def fn(cand):
            return kidx.index_topk(q, w, k8, pos1, topk, k_scale=ks, config=run.best["index_decode_fp8"],
                                   method=cand[0], score_dtype=cand[1], sorted=False, topk_config=run.radix)

        def verify(sel):  # the same keys as the fp32 selection, except near-ties (bf16 rounding)
            sc = kidx.index_scores(q, w, k8, pos1, k_scale=ks)
            agree = topk_agreement(sel, exact, sc)
            return agree["same_counts"] and agree["score_gap"] < NEAR_TIE, agree["score_gap"]

        run.best["topk_decode"] = sweep(run, "index_topk_decode", TOPK_CANDIDATES, fn, verify, None,
                                        B * S * (d["DI"] + 4), "bf16", f"B={B} T=1 S={S} k={topk} fp8 keys",
                                        names=[topk_name(*c) for c in TOPK_CANDIDATES]) or OLD["topk"]
        del q, w, k, k8, ks, ref, ref8, exact
        free()

        # indexer prefill: one 4,096-row chunk late in a 16K context (dry: tiny). FP8 first: the DSA core uses it.
        S = 16384 if run.mode != "dry" else 96
        T = min(4096, S // 4)
        q, w, k = indexer_inputs(run, 1, T, S, seed=21)
        pos = torch.arange(S - T, S, device=dev)
        rows = min(T, 128)
        ref = torch_indexer.index_scores(q[:, :rows], w[:, :rows], k, pos[:rows])
        ref8 = torch_indexer.fp8_index_scores(q[:, :rows], w[:, :rows], k, pos[:rows], rotate=False)
        fin = torch.isfinite(ref)
        fl = indexer_flops(run, causal_pairs(pos))
        for fp8, name, reference in ((True, "fp8", ref8), (False, "bf16", ref)):
            def fn(cfg, fp8=fp8):
                return kidx.index_scores(q, w, k, pos, fp8=fp8, config=cfg)

            def verify(out, reference=reference, fp8=fp8):  # FP8: DeepGEMM's cosine criterion (sums differ in order)
                if fp8:
                    e = cos_diff(out[:, :rows][fin], reference[fin])
                    return e < FP8_COS_TOL, e
                e = rel_err(out[:, :rows][fin], reference[fin])
                return e < 1e-4, e

            run.best[f"index_prefill_{name}"] = sweep(run, f"index_prefill_{name}", cands[f"index_prefill_{name}"],
                                                      fn, verify, fl, None, "fp8" if fp8 else "bf16", f"T={T} S={S}")
        del q, w, k, ref, ref8
        free()

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
    variants = [("cudnn_sdpa", lambda: v), ("cudnn_sdpa_vpad192", lambda: F.pad(v, (0, d["d_qk"] - d["d_v"])))]
    for name, make_v in variants:
        try:
            vv = make_v()
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


def torch_path_dsa_core(q, w, k, pos, qa, qr, lat, kr, topk, scale):
    """The DSA core on dslib's PyTorch path (chapter 3): index scores in chunks, topk_selection (a stable sort),
    sparse_attention over the gathered latents (bf16)."""
    scores = torch_indexer.index_scores(q, w, k, pos)
    sel = topk_selection(scores, topk, pos)
    del scores
    return sparse_attention(qa, qr, lat, kr, sel, scale)


def section_prefill(run: Run) -> None:
    d, dev = run.dims, run.device
    sz = SIZES[run.mode]
    scale = d["d_qk"] ** -0.5
    bi, b8, bs = run.best["index_prefill_bf16"], run.best["index_prefill_fp8"], run.best["sparse_prefill"]
    tk, old_tk = run.topk("prefill"), dict(method=OLD["topk"][0], score_dtype=OLD["topk"][1])
    tk_note = f"top-k {topk_name(*run.best['topk_prefill'])}"
    for L in sz["prefill"]:
        if run.left() < (15 if L == sz["prefill"][0] else 10):
            print(f"  L={L}: skipped (time budget)", flush=True)
            run.add("gpu_kernels_checks.csv", check=f"prefill L={L}", ok="skipped", detail="time budget spent")
            continue
        times = {}
        try:
            with torch.no_grad():
                pos = torch.arange(L, device=dev)
                pos2 = pos.view(1, L)
                q, w, k = indexer_inputs(run, 1, L, L, seed=L)
                qa, qr, lat, kr = mla_inputs(run, 1, L, L, seed=L + 1)
                fl_idx = indexer_flops(run, causal_pairs(pos))
                fl_mla = mla_flops(run, causal_pairs(pos, k=d["topk"]))

                def dsa(topk_kw=tk, sparse_cfg=bs):  # the attention does not need the indices in score order
                    s = kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False, config=b8, **topk_kw)
                    return kmla.sparse_mla(qa, qr, lat, kr, s, scale, **mla(sparse_cfg))

                out = dsa()
                if not torch.isfinite(out).all():
                    raise RuntimeError(f"DSA core output not finite at L={L}")
                del out
                t = measure(dsa, run)
                times["dsa"] = t["median_ms"]
                record(run, "prefill", "dsa_core(fp8 idx+topk+sparse)", L=L, batch=1, t=t, flops=fl_idx / 2 + fl_mla,
                       peak="bf16", note=f"chosen: {tk_note}, sparse {label(bs)}; FLOPs: FP8 indexer counted at half")
                name, t = dense_prefill(run, L)  # the baseline next (its inputs fit beside these: ~60 GiB at 128K)
                if t is not None:
                    times["dense"] = t["median_ms"]
                    record(run, "prefill", f"dense_{name}", L=L, batch=1, t=t, flops=mha_flops(run, causal_pairs(pos)),
                           peak="bf16")
                free()
                t = measure(lambda: scores_only(q, w, k, pos2, fp8=True, config=b8), run)
                times["indexer"] = t["median_ms"]
                record(run, "prefill", "indexer_fp8(+quant)", L=L, batch=1, t=t, flops=fl_idx, peak="fp8")
                t = measure(lambda: kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False, config=b8, **tk),
                            run)
                times["index_topk"] = t["median_ms"]
                record(run, "prefill", "index_topk_fp8", L=L, batch=1, t=t, flops=fl_idx, peak="fp8",
                       note=f"indexer + {tk_note}, unsorted")
                sel = kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False, config=b8, **tk)
                t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **mla(bs)), run)
                times["sparse"] = t["median_ms"]
                row = record(run, "prefill", "sparse_mla(indexer sel)", L=L, batch=1, t=t, flops=fl_mla, peak="bf16",
                             note=label(bs))
                run.goals[("sparse_pct", L)] = row.get("pct_of_peak")
                sel_r = strided_selection(pos, d["topk"], 1, seed=5)
                t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel_r, scale, **mla(bs)), run)
                record(run, "prefill", "sparse_mla(strided sel)", L=L, batch=1, t=t, flops=fl_mla, peak="bf16",
                       note=label(bs))
                del sel_r
                if run.left() > 30:  # the first version, for the before / after
                    if bs != OLD["sparse"]:
                        t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **mla(OLD["sparse"])), run)
                        record(run, "prefill", "sparse_mla_one_pass(indexer sel)", L=L, batch=1, t=t, flops=fl_mla,
                               peak="bf16", note="first version")
                    t = measure(lambda: dsa(old_tk, OLD["sparse"]), run)
                    times["dsa_old"] = t["median_ms"]
                    record(run, "prefill", "dsa_core(first version)", L=L, batch=1, t=t, flops=fl_idx / 2 + fl_mla,
                           peak="bf16", note="torch.topk fp32, one-pass sparse MLA")
                if run.left() > 20:
                    t = measure(lambda: scores_only(q, w, k, pos2, fp8=False, config=bi), run)
                    record(run, "prefill", "indexer_bf16", L=L, batch=1, t=t, flops=fl_idx, peak="bf16")
                if L in sz["torch_path"] and run.left() > 20:
                    t = measure(lambda: torch_path_dsa_core(q, w, k, pos, qa, qr, lat, kr, d["topk"], scale), run)
                    record(run, "prefill", "dsa_core_torch_path", L=L, batch=1, t=t, flops=fl_idx + fl_mla, peak="bf16",
                           note="dslib PyTorch: index_scores, topk_selection, sparse_attention (bf16)")
                del q, w, k, qa, qr, lat, kr, sel
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
            old = f"; first version {times['dense'] / times['dsa_old']:.2f}x" if "dsa_old" in times else ""
            line = (f"prefill L={L:>6d}: DSA core {times['dsa']:9.2f} ms (index_topk {times.get('index_topk', 0):.2f}"
                    f" of which indexer {times.get('indexer', 0):.2f}, sparse {times.get('sparse', 0):.2f}) vs dense "
                    f"cuDNN {times['dense']:9.2f} ms -> {ratio:5.2f}x{old}")
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
    tk = run.topk("decode")
    tk_note = f"top-k {topk_name(*run.best['topk_decode'])}, sparse {label(bs)}"
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
                fl_sp = mla_flops(run, B * min(S, d["topk"]))
                by_sp = B * min(S, d["topk"]) * (d["C"] + d["R"]) * 2

                def dsa_step(keys=(k8, ks), topk_kw=tk, sparse_cfg=bs, sort=False):
                    s = kidx.index_topk(q, w, keys[0], pos1, d["topk"], k_scale=keys[1], sorted=sort,
                                        config=b8 if keys[1] is not None else bi, **topk_kw)
                    return kmla.sparse_mla(qa, qr, lat, kr, s, scale, **mla(sparse_cfg))

                steps = [("dsa_step_fp8keys", dsa_step, f"chosen: {tk_note}"),
                         ("dsa_step_bf16keys", lambda: dsa_step((k, None)), f"chosen: {tk_note}, bf16 keys"),
                         ("dsa_step_first_version", lambda: dsa_step(topk_kw=dict(method="torch"),
                                                                      sparse_cfg=OLD["sparse"], sort=True),
                          "fp8 keys, torch.topk fp32 sorted, one-pass sparse MLA")]
                for name, fn, note in steps:
                    if name != "dsa_step_fp8keys" and run.left() < 15:
                        continue
                    t = measure(fn, run)
                    best[name] = t["median_ms"]
                    record(run, "decode", name, L=S, batch=B, t=t, note=f"{note}, eager")
                    try:
                        g = as_graph(fn, run)
                        if g is not None:
                            t = measure(g, run)
                            best[name + "_graph"] = t["median_ms"]
                            record(run, "decode", name + "_graph", L=S, batch=B, t=t, note=f"{note}, CUDA graph")
                    except Exception as err:  # noqa: BLE001
                        print(f"  CUDA graph of {name} failed: {type(err).__name__}: {err}"[:300], flush=True)
                if run.left() > 15:  # the parts of the step
                    t = measure(lambda: kidx.index_scores(q, w, k8, pos1, k_scale=ks, config=b8), run)
                    record(run, "decode", "indexer_fp8", L=S, batch=B, t=t, nbytes=B * S * (d["DI"] + 4), flops=fl_idx,
                           peak="fp8")
                    t = measure(lambda: kidx.index_topk(q, w, k8, pos1, d["topk"], k_scale=ks, sorted=False, config=b8,
                                                        **tk), run)
                    record(run, "decode", "index_topk_fp8", L=S, batch=B, t=t, nbytes=B * S * (d["DI"] + 4),
                           note=f"top-k {topk_name(*run.best['topk_decode'])}")
                    sel = kidx.index_topk(q, w, k8, pos1, d["topk"], k_scale=ks, sorted=False, config=b8, **tk)
                    t = measure(lambda: kmla.sparse_mla(qa, qr, lat, kr, sel, scale, **mla(bs)), run)
                    record(run, "decode", "sparse_mla", L=S, batch=B, t=t, flops=fl_sp, nbytes=by_sp, note=label(bs))
                    del sel
                del q, w, k, k8, ks
                free()

                fl_dense = mla_flops(run, B * S)
                by_dense = B * S * (d["C"] + d["R"]) * 2
                dense_fns = {"dense_mla_triton": (lambda: kmla.dense_mla(qa, qr, lat, kr, pos1, scale, **mla(bd)),
                                                  f"chosen: {label(bd)}")}
                if bd != OLD["dense"]:
                    dense_fns["dense_mla_triton_one_pass"] = (
                        lambda: kmla.dense_mla(qa, qr, lat, kr, pos1, scale, **mla(OLD["dense"])), "first version")
                dense_fns["dense_torch_bmm"] = (lambda: torch_dense_decode(qa, qr, cache, scale, d["C"]), "")
                if dev.type == "cuda" and B == 1:  # SDPA's math path expands the MQA cache per head (288 GiB at B=32)
                    dense_fns["dense_sdpa_mqa"] = (lambda: sdpa_mqa_decode(qa, qr, cache, scale, d["C"]), "")
                ref = None
                for name, (fn, note) in dense_fns.items():
                    if run.left() < 8:
                        break
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
                        record(run, "decode", name, L=S, batch=B, t=t, flops=fl_dense, nbytes=by_dense, note=note)
                        g = as_graph(fn, run) if name.startswith("dense_mla_triton") else None
                        if g is not None:
                            t = measure(g, run)
                            best[name + "_graph"] = t["median_ms"]
                            record(run, "decode", name + "_graph", L=S, batch=B, t=t, flops=fl_dense,
                                   nbytes=by_dense, note=f"{note}, CUDA graph".lstrip(", "))
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
            first = [v for n, v in dense.items() if n.startswith("dense_mla_triton")
                     and (("one_pass" in n) or bd == OLD["dense"])]
            vs_old = f"; vs the first dense kernel {min(first) / sv:.2f}x" if first else ""
            line = (f"decode B={B:>2d} S={S}: DSA {sv:.3f} ms ({sn}) vs best dense {dv:.3f} ms ({dn}) -> "
                    f"{dv / sv:.2f}x{vs_old}")
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
    ap.add_argument("--quick", action="store_true", help="smaller sizes, two candidates per kernel (< 90 s)")
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
    # Tuning verifies every candidate against PyTorch before timing it; the goal sizes come next (decode, then
    # prefill from 128K down), the full-width checks last, with CHECKS_RESERVE_S of the budget kept for them.
    checks = "checks" not in skip
    run.reserve = CHECKS_RESERVE_S if checks else 0.0
    if "tuning" not in skip:
        guarded(run, "tuning", section_tuning)
    if "decode" not in skip:
        guarded(run, "decode", section_decode)
    if "prefill" not in skip:  # largest size first: the headline numbers survive a short budget
        guarded(run, "prefill", section_prefill)
    run.reserve = 0.0
    if checks:
        guarded(run, "checks", section_checks)
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
