"""FP8 linears and the grouped MoE kernels on one GPU (chapter 6): correctness at full width, then timings.

At the 671B model's sizes (d = 7168, I = 2048, 256 routed experts + 1 shared, top-8), with random FP8 weights
generated on the GPU:

  checks        act_quant (Triton vs torch, bit for bit); fp8_linear (auto = FP8Linear's choice by shape,
                torch._scaled_mm, Triton) vs the fp32 emulation of the same maths and vs today's dequantise + bf16
                F.linear; which token counts M cuBLAS's block-scaled FP8 takes unpadded (a probe);
                FP8Linear.forward takes the fast path; the grouped MoE vs its fp32 emulation and vs today's torch
                path (N = 1 and 256)
  moe           the MoE layer at N = 1, 16384 (the goals), then 4096 .. 65536 tokens, routed by dslib.moe.Gate
                (random weights) and by a skewed random router: today's torch path (per-expert loop, each expert
                dequantised per call), the same loop on the FP8 fast path, the grouped FP8 kernels (a few configs
                tried), grouped bf16 (torch._grouped_mm); for decode sizes also the whole layer (MoE.forward:
                gate + experts) and both as CUDA graphs; time per stage of the grouped kernels at 16K
  fp8_linear    the model's projection shapes at M = 1, 32, 4096, 16384: scaled_mm vs Triton (a few tile
                configs tried, the best kept) vs auto vs dequantise + F.linear (today's FP8Linear) vs bf16
                F.linear on a pre-dequantised weight; lm_head in bf16
Timings are triton.testing.do_bench medians (p10-p90 spread) after a warm-up, against the H200 rooflines of
REFERENCE.md §8.4 (FP8 1979 / bf16 989 TFLOP/s dense datasheet, 4.8 TB/s HBM). Every section runs in
try/except; each CSV row is written as it is measured; a --budget-s deadline skips what is left (recorded).

    python benchmarks/gpu_fp8_moe.py --out data/gpu_fp8_moe            # one H200: 90 s budget, ~1.7 min wall
    python benchmarks/gpu_fp8_moe.py --quick --out /tmp/fp8_quick       # < 60 s: one case per section
    python benchmarks/gpu_fp8_moe.py --tiny --out /tmp/fp8_tiny         # the script's logic on CPU (interpreter)

Writes env.json, checks.csv, fp8_linear.csv, moe.csv, moe_stages.csv, errors.txt, summary.txt under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = {"fp8": 1978.9, "bf16": 989.4, "hbm_gbs": 4800.0}  # H200 SXM dense datasheet figures (REFERENCE.md §8.4)

# name -> (out_features N, in_features K); weights stored FP8 except lm_head (bf16 in the checkpoint)
SHAPES = {
    "q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "kv_a_proj_with_mqa": (576, 7168),
    "o_proj": (7168, 16384), "indexer.wq_b": (8192, 1536), "dense gate/up_proj": (18432, 7168),
    "dense down_proj": (7168, 18432), "lm_head (bf16)": (129280, 7168),
}
GEMM_CONFIGS_SMALL = [(16, 32, 4, 4), (16, 64, 4, 5), (16, 128, 4, 4)]  # (BM, BN, warps, stages)
GEMM_CONFIGS_LARGE = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4)]
# MoEConfig(block_m, up_warps, up_stages, down_block_n, down_warps, down_stages)
MOE_CONFIGS_SMALL = [(16, 4, 4, 64, 4, 4), (16, 4, 3, 128, 4, 3), (16, 4, 6, 64, 4, 6)]
MOE_CONFIGS_LARGE = [(64, 4, 3, 128, 4, 4), (128, 8, 3, 128, 8, 4), (64, 4, 2, 128, 4, 3)]
SCALED_MM_PROBE_M = [1, 2, 4, 8, 15, 16, 17, 24, 32, 33, 64, 99, 112, 128]  # which M cuBLAS takes, unpadded


FIELDS = {  # fixed columns per CSV, whatever the first row holds (a skipped or failed case has fewer)
    "checks": ["what", "shape", "metric", "value", "tolerance", "ok", "note"],
    "fp8_linear": ["shape", "N", "K", "M", "impl", "config", "median_ms", "p10_ms", "p90_ms", "tflops", "pct_peak",
                   "peak", "weight_GB_s", "note"],
    "moe": ["tokens", "routing", "max_violation", "impl", "config", "median_ms", "p10_ms", "p90_ms", "tflops",
            "pct_fp8_peak", "pct_bf16_peak", "experts_touched", "weight_GB_s", "peak_extra_MiB", "note"],
    "moe_stages": ["tokens", "stage", "config", "median_ms", "p10_ms", "p90_ms", "tflops", "tile_rows_computed",
                   "useful_rows"],
}


class Run:
    """Output folder, CSV writers (flushed per row), error log and the wall-clock budget."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.files, self.writers, self.rows = {}, {}, {}
        (out / "errors.txt").write_text("")

    def write(self, table: str, row: dict) -> None:
        if table not in self.writers:
            f = open(self.out / f"{table}.csv", "w", newline="")
            self.files[table], self.rows[table] = f, []
            self.writers[table] = csv.DictWriter(f, fieldnames=FIELDS.get(table, list(row)), extrasaction="ignore")
            self.writers[table].writeheader()
        self.writers[table].writerow(row)
        self.files[table].flush()
        self.rows[table].append(row)

    def error(self, where: str) -> None:
        text = f"--- {where}\n{traceback.format_exc()}\n"
        print(text, file=sys.stderr)
        with open(self.out / "errors.txt", "a") as f:
            f.write(text)

    def begin(self, section: str, share_s: float) -> None:
        """Start a section with its own share of the budget (never past the overall deadline)."""
        self.section_deadline = min(self.deadline, time.monotonic() + share_s)
        print(f"== {section} (up to {share_s:.0f} s)")

    def time_left(self) -> float:
        return getattr(self, "section_deadline", self.deadline) - time.monotonic()


# --------------------------------------------------------------------------------------------------- timing
def bench(fn, device, *, quick: bool) -> tuple[float, float, float]:
    """(median, p10, p90) milliseconds of fn() after a warm-up. GPU: triton.testing.do_bench (it flushes L2
    between calls); CPU: perf_counter over a few calls."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (10, 30) if quick else (10, 60)
        fn()  # compile / first-call work outside the measurement
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > 100:  # slow (today's per-expert loop at 16K tokens): two more timed calls
            times = [start.elapsed_time(end)]
            for _ in range(2):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times), min(times), max(times)
        med, p10, p90 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.1, 0.9])
        return float(med), float(p10), float(p90)
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def peak_mib(fn, device) -> float:
    """Extra device memory one call allocates at its peak, MiB (NaN on CPU)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def as_graph(fn, device):
    """fn captured as a CUDA graph (a decode step replays one: no launch gaps), or None on CPU."""
    import torch

    if device.type != "cuda":
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


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------------- weights
def random_fp8(n: int, k: int, device, gen, std: float = 0.006):
    """A random weight [n, k] ~ N(0, std) as the checkpoint stores it: e4m3 + 128x128 fp32 block scales."""
    import torch

    from dslib.checkpoint import quantize_fp8_blocks

    return quantize_fp8_blocks(torch.randn(n, k, device=device, generator=gen) * std)


def random_fp8_moe(cfg, device, seed: int = 0):
    """One MoE layer of `cfg` with FP8Linear experts (the model's storage), filled with random weights."""
    import torch

    from dslib.checkpoint import FP8Linear, use_fp8_storage
    from dslib.moe import MoE

    with torch.device("meta"):
        moe = MoE(cfg)
        use_fp8_storage(moe, prefix=f"model.layers.{cfg.first_k_dense_replace}.mlp.")
    moe = moe.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in moe.modules():
            if isinstance(mod, FP8Linear):
                q, s = random_fp8(mod.out_features, mod.in_features, device, gen)
                mod.weight.copy_(q)
                mod.weight_scale_inv.copy_(s)
        moe.gate.weight.data = (torch.randn(moe.gate.weight.shape, device=device, generator=gen) * 0.006).bfloat16()
        moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, device=device, generator=gen) * 0.01)
    return moe.eval()


def today_expert(mlp):
    """An expert as FP8Linear.forward computed it before the fast path: dequantise each weight, bf16 F.linear."""
    import torch.nn.functional as F

    from dslib.checkpoint import dequantize_fp8_blocks

    def lin(m, t):
        return F.linear(t, dequantize_fp8_blocks(m.weight, m.weight_scale_inv, t.dtype))

    return lambda t: lin(mlp.down_proj, F.silu(lin(mlp.gate_proj, t)) * lin(mlp.up_proj, t))


def today_moe(moe, x, routing):
    """Today's torch path: chapter 4's dispatch over the per-expert loop, each expert dequantised per call."""
    from dslib.moe import dispatch

    experts = [today_expert(m) for m in moe.experts]
    return dispatch(x, routing.topk_idx, routing.topk_weight, experts) + today_expert(moe.shared_experts)(x)


def skewed_routing(n_tokens: int, cfg, device, gen, sigma: float = 0.3):
    """k distinct experts per token drawn with popularity p_e ∝ exp(sigma · z_e) (a lognormal skew), weights
    positive and summing to routed_scaling_factor, as the gate's."""
    import torch

    from dslib.moe import Routing

    e = cfg.n_routed_experts
    p = torch.exp(sigma * torch.randn(e, device=device, generator=gen))
    idx = torch.multinomial(p.expand(n_tokens, e), cfg.num_experts_per_tok, replacement=False, generator=gen)
    w = torch.rand(n_tokens, cfg.num_experts_per_tok, device=device, generator=gen) + 0.1
    w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    return Routing(None, None, None, idx, w)


def max_violation(idx, n_experts: int) -> float:
    import torch

    load = torch.bincount(idx.reshape(-1), minlength=n_experts).float()
    return float(load.max() / load.mean() - 1)


# --------------------------------------------------------------------------------------------------- sections
def env_info(device, args) -> dict:
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, device=str(device),
                has_scaled_mm=hasattr(torch, "_scaled_mm"), has_grouped_mm=hasattr(torch, "_grouped_mm"),
                quick=args.quick, tiny=args.tiny, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    memory_GiB=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    return info


def check(run: Run, what: str, shape: str, metric: str, value: float, tol: float, note: str = "") -> None:
    ok = bool(value <= tol)
    run.write("checks", dict(what=what, shape=shape, metric=metric, value=f"{value:.3e}", tolerance=f"{tol:.1e}",
                             ok=ok, note=note))
    print(f"  [{'ok' if ok else 'FAIL'}] {what:<44} {shape:<22} {metric} = {value:.2e} (<= {tol:.0e}) {note}")


def checks_fp8(run: Run, device, dims: dict) -> None:
    import torch

    from dslib.checkpoint import FP8Linear, dequantize_fp8_blocks
    from dslib.kernels import fp8

    gen = torch.Generator(device=device).manual_seed(1)
    d = dims["d"]
    # act_quant: bit for bit, on activations with a spread of magnitudes (and one NaN row)
    x = torch.randn(dims["aq_rows"], d, device=device, generator=gen) * torch.exp2(
        torch.randint(-12, 8, (dims["aq_rows"], 1), device=device, generator=gen).float())
    x = x.bfloat16()
    x[5, 7] = float("nan")
    q, s = fp8.act_quant(x)
    q_ref, s_ref = fp8.act_quant_torch(x)
    fin = s_ref.isfinite().all(-1)
    byte_diff = int((q[fin].view(torch.uint8) != q_ref[fin].view(torch.uint8)).sum())
    scale_diff = int((s[fin] != s_ref[fin]).sum())
    check(run, "act_quant Triton == torch: e4m3 bytes differing", f"[{x.shape[0]}, {d}] bf16", "count", byte_diff, 0)
    check(run, "act_quant Triton == torch: scales differing", f"[{x.shape[0]}, {d}] bf16", "count", scale_diff, 0)
    check(run, "act_quant NaN row -> NaN scale", "row 5", "finite scales", int(s[5].isfinite().sum()), d // 128 - 1)

    # fp8_linear: each implementation against the fp32 emulation of the same maths
    for name in dims["check_shapes"]:
        n, k = SHAPES[name]
        w8, ws = random_fp8(n, k, device, gen)
        w_deq = dequantize_fp8_blocks(w8, ws, torch.float32)
        for m in dims["check_m"]:
            xm = torch.randn(m, k, device=device, generator=gen).bfloat16()
            x8, sx = fp8.act_quant_torch(xm)
            emul = fp8.dequantize_act(x8, sx) @ w_deq.T
            today = torch.nn.functional.linear(xm, w_deq.bfloat16())
            for impl in ("auto", "scaled_mm", "triton"):  # auto: what FP8Linear runs (by shape, padded)
                if impl == "scaled_mm" and (device.type != "cuda" or fp8.scaled_mm_rows(m) != m):
                    continue  # cuBLAS is handed only M >= 16, multiples of 16 (the probe below shows why)
                try:
                    y = fp8.fp8_linear(xm, w8, ws, impl=impl)
                except Exception as err:
                    run.write("checks", dict(what=f"fp8_linear {impl}", shape=f"{name} M={m}", metric="error",
                                             value=repr(err)[:200], tolerance="", ok=False, note="raised"))
                    print(f"  [FAIL] fp8_linear {impl} {name} M={m}: {err!r}"[:300])
                    continue
                check(run, f"fp8_linear {impl} vs fp32 emulation", f"{name} M={m}", "rel err", rel_err(y, emul), 1e-2,
                      "bf16 output, FP8 tensor-core sums")
                check(run, f"fp8_linear {impl} vs dequantise+bf16 linear", f"{name} M={m}", "rel err",
                      rel_err(y, today), 6e-2, "activation e4m3 rounding, ~3% expected")
        if device.type == "cuda":
            lin = FP8Linear(k, n).to(device)
            lin.weight.data, lin.weight_scale_inv.data = w8, ws
            xm = torch.randn(64, k, device=device, generator=gen).bfloat16()
            fast = fp8.linear_fast_path(xm, w8, ws)
            check(run, "FP8Linear.forward takes the FP8 fast path", name, "not taken", float(fast is None), 0)
            if fast is not None:
                check(run, "FP8Linear.forward == fp8_linear", name, "max abs diff",
                      float((lin(xm).float() - fast.float()).abs().max()), 0)
    if device.type == "cuda" and hasattr(torch, "_scaled_mm"):  # which token counts cuBLAS takes, unpadded
        n, k = SHAPES["kv_a_proj_with_mqa"]
        w8, ws = random_fp8(n, k, device, gen)
        taken, refused = [], []
        for m in dims["probe_m"]:
            x8, sx = fp8._act_quant_2d(torch.randn(m, k, device=device, generator=gen).bfloat16(), col_major_scale=True)
            try:
                fp8.scaled_mm(x8, sx, w8, ws)
                torch.cuda.synchronize()
                taken.append(m)
            except RuntimeError:
                refused.append(m)
        rule = all((m >= fp8.SCALED_MM_MIN_M and m % fp8.SCALED_MM_M_MULTIPLE == 0) <= (m in taken)
                   for m in dims["probe_m"])
        run.write("checks", dict(what="torch._scaled_mm block-scaled FP8 takes M (unpadded)", shape=f"N={n} K={k}",
                                 metric="M taken / refused", value=f"{taken} / {refused}", tolerance="", ok=rule,
                                 note="ok: every M that fp8_linear hands it (>= 16, multiple of 16) is taken"))
        print(f"  [{'ok' if rule else 'FAIL'}] torch._scaled_mm takes M = {taken}, refuses {refused} "
              f"(fp8_linear pads M >= {fp8.SCALED_MM_MIN_M} to a multiple of {fp8.SCALED_MM_M_MULTIPLE})")
    if fp8._SCALED_MM_REFUSED:
        run.write("checks", dict(what="scaled_mm refused (auto fell back to Triton)", shape=str(fp8._SCALED_MM_REFUSED),
                                 metric="", value="", tolerance="", ok=True, note=""))


def checks_moe(run: Run, device, dims: dict, moe, cfg) -> None:
    import torch

    from dslib.kernels import moe as kmoe

    gen = torch.Generator(device=device).manual_seed(2)
    stacked = kmoe.stack_experts(moe)
    for n in dims["check_tokens"]:
        x = torch.randn(n, cfg.hidden_size, device=device, generator=gen).bfloat16()
        routing = moe.gate.route(x)
        y = kmoe.forward(moe, x, routing)
        idx = torch.cat([routing.topk_idx, routing.topk_idx.new_full((n, 1), stacked.n_routed)], 1)
        wt = torch.cat([routing.topk_weight, routing.topk_weight.new_ones(n, 1)], 1)
        emul = kmoe.moe_experts_torch(x.float(), idx, wt, stacked.w13, stacked.s13, stacked.w2, stacked.s2)
        check(run, "grouped FP8 MoE vs fp32 emulation", f"N={n}", "rel err", rel_err(y, emul), 1e-2,
              "bf16 rows + FP8 sums + rare e4m3 flips")
        check(run, "grouped FP8 MoE vs today's torch path", f"N={n}", "rel err", rel_err(y, today_moe(moe, x, routing)),
              8e-2, "activation + intermediate e4m3 rounding")
        check(run, "grouped FP8 MoE output finite", f"N={n}", "non-finite", float((~y.isfinite()).sum()), 0)


def bench_fp8_linear(run: Run, device, dims: dict, quick: bool) -> None:
    import torch
    import torch.nn.functional as F

    from dslib.checkpoint import dequantize_fp8_blocks
    from dslib.kernels import fp8

    gen = torch.Generator(device=device).manual_seed(3)
    for name in dims["linear_shapes"]:
        n, k = SHAPES[name]
        bf16_only = name.startswith("lm_head")
        if bf16_only:
            w_bf16 = (torch.randn(n, k, device=device, generator=gen) * 0.006).bfloat16()
        else:
            w8, ws = random_fp8(n, k, device, gen)
            w_bf16 = dequantize_fp8_blocks(w8, ws, torch.bfloat16)
        for m in dims["linear_m"]:
            if run.time_left() < 0:
                run.write("fp8_linear", dict(shape=name, N=n, K=k, M=m, impl="skipped (budget)"))
                continue
            x = torch.randn(m, k, device=device, generator=gen).bfloat16()
            flops = 2 * m * n * k
            cases = [("bf16 F.linear (weight pre-dequantised)", lambda: F.linear(x, w_bf16), "bf16", "")]
            if not bf16_only:
                cases.insert(0, ("dequantise + F.linear (today)",
                                 lambda: F.linear(x, dequantize_fp8_blocks(w8, ws, torch.bfloat16)), "bf16", ""))
                if device.type == "cuda" and fp8.scaled_mm_rows(m) == m:
                    cases.append(("scaled_mm", lambda: fp8.fp8_linear(x, w8, ws, impl="scaled_mm"), "fp8", ""))
                cases.append(("auto (FP8Linear's choice)", lambda: fp8.fp8_linear(x, w8, ws), "fp8",
                              "scaled_mm" if fp8.scaled_mm_rows(m) and device.type == "cuda" else "triton"))
                configs = GEMM_CONFIGS_SMALL if m <= 32 else GEMM_CONFIGS_LARGE
                for c in configs[: 2 if quick else None]:
                    cfg = fp8.GemmConfig(*c)
                    cases.append(("triton", lambda cfg=cfg: fp8.fp8_linear(x, w8, ws, impl="triton", config=cfg), "fp8",
                                  "x".join(map(str, c))))
            best_triton = None
            for impl, fn, kind, config in cases:
                try:
                    med, p10, p90 = bench(fn, device, quick=quick)
                except Exception as err:
                    run.write("fp8_linear", dict(shape=name, N=n, K=k, M=m, impl=impl, config=config,
                                                 note=repr(err)[:160]))
                    print(f"  {name} M={m} {impl} {config}: {err!r}"[:200])
                    continue
                tflops = flops / med / 1e9
                wbytes = n * k * (2 if kind == "bf16" else 1)
                row = dict(shape=name, N=n, K=k, M=m, impl=impl, config=config, median_ms=round(med, 4),
                           p10_ms=round(p10, 4), p90_ms=round(p90, 4), tflops=round(tflops, 1),
                           pct_peak=round(100 * tflops / PEAK[kind], 1), peak=kind,
                           weight_GB_s=round(wbytes / med / 1e6, 1), note="")
                run.write("fp8_linear", row)
                if impl == "triton" and (best_triton is None or med < best_triton[0]):
                    best_triton = (med, config)
                print(f"  {name:<20} M={m:<6} {impl:<40} {config:<12} {med:8.3f} ms {tflops:7.1f} TFLOP/s")
            if best_triton:
                run.write("fp8_linear", dict(shape=name, N=n, K=k, M=m, impl="triton best", config=best_triton[1],
                                             median_ms=round(best_triton[0], 4),
                                             tflops=round(flops / best_triton[0] / 1e9, 1)))


def bench_moe(run: Run, device, dims: dict, moe, cfg, quick: bool) -> None:
    import torch

    from dslib.kernels import moe as kmoe
    from dslib.moe import dispatch

    gen = torch.Generator(device=device).manual_seed(4)
    stacked = kmoe.stack_experts(moe)
    d, inter, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    shared = 1 if cfg.n_shared_experts else 0
    bf16 = None
    if dims["bf16_grouped"]:
        try:  # dequantised stacked copies for the bf16 grouped variant (~22 GB at full size)
            from dslib.checkpoint import dequantize_fp8_blocks

            bf16 = (torch.empty(stacked.w13.shape, dtype=torch.bfloat16, device=device),
                    torch.empty(stacked.w2.shape, dtype=torch.bfloat16, device=device))
            half = stacked.s13.shape[1] // 2
            for e in range(stacked.w13.shape[0]):
                bf16[0][e, :inter] = dequantize_fp8_blocks(stacked.w13[e, :inter], stacked.s13[e, :half], torch.bfloat16)
                bf16[0][e, inter:] = dequantize_fp8_blocks(stacked.w13[e, inter:], stacked.s13[e, half:], torch.bfloat16)
                bf16[1][e] = dequantize_fp8_blocks(stacked.w2[e], stacked.s2[e], torch.bfloat16)
        except Exception:
            run.error("bf16 stacked weights")
            bf16 = None
    best_cfg: dict[int, tuple] = {}
    for n in dims["moe_tokens"]:
        x = torch.randn(n, d, device=device, generator=gen).bfloat16()
        routings = [("gate", moe.gate.route(x))]
        if not quick:
            routings.append(("skewed", skewed_routing(n, cfg, device, gen)))
        for rname, routing in routings:
            if run.time_left() < 0:
                run.write("moe", dict(tokens=n, routing=rname, impl="skipped (budget)"))
                continue
            idx = torch.cat([routing.topk_idx, routing.topk_idx.new_full((n, 1), stacked.n_routed)], 1)
            wt = torch.cat([routing.topk_weight, routing.topk_weight.new_ones(n, 1)], 1)
            touched = int(torch.unique(routing.topk_idx).numel()) + shared
            flops = 2 * n * (k + shared) * 3 * d * inter
            vio = max_violation(routing.topk_idx, cfg.n_routed_experts)
            cases = []
            if n <= 16384:  # today's loop takes seconds beyond
                cases.append(("torch: per-expert loop, dequantise per call (today)",
                              lambda: today_moe(moe, x, routing), "bf16", ""))
            if device.type == "cuda" and n <= 16384:  # the same loop, each FP8Linear on the block-scaled fast path
                cases.append(("torch: per-expert loop, FP8 fast path", lambda: dispatch(
                    x, routing.topk_idx, routing.topk_weight, moe.experts) + moe.shared_experts(x), "fp8", ""))
            small = n * (k + shared) / (cfg.n_routed_experts + shared) <= 16  # rows per expert: decode-like
            if rname == "gate" and n in dims["moe_sweep_tokens"]:  # try several tile configs, remember the best
                configs = (MOE_CONFIGS_SMALL if small else MOE_CONFIGS_LARGE)[: 2 if quick else None]
            else:  # the default, and the best config of the nearest swept size in the same regime
                near = [t for t in best_cfg if (t * (k + shared) / (cfg.n_routed_experts + shared) <= 16) == small]
                nearest = best_cfg.get(n, best_cfg[min(near, key=lambda t: abs(math.log(t / n)))] if near else None)
                configs = [None] + ([nearest] if nearest else [])
            for c in configs:
                mc = kmoe.MoEConfig(*c) if c else None
                label = "x".join(map(str, c)) if c else "default"
                cases.append(("triton: grouped FP8", lambda mc=mc: kmoe.moe_experts(
                    x, idx, wt, stacked.w13, stacked.s13, stacked.w2, stacked.s2, config=mc, check=False), "fp8", label))
            if bf16 is not None:
                cases.append(("torch._grouped_mm: grouped bf16",
                              lambda: kmoe.moe_experts_bf16(x, idx, wt, bf16[0], bf16[1]), "bf16", ""))
            if n <= 32 and rname == "gate":  # decode: the whole layer as MoE.forward runs it (gate + experts)
                xb = x.view(1, n, d)
                cases.append(("triton: MoE.forward (gate + grouped FP8)", lambda xb=xb: moe(xb, backend="triton"),
                              "fp8", "default"))
            best = None
            for impl, fn, kind, config in cases:
                if run.time_left() < 0:
                    run.write("moe", dict(tokens=n, routing=rname, impl=impl, config=config, note="skipped (budget)"))
                    continue
                try:
                    med, p10, p90 = bench(fn, device, quick=quick)
                    mem = peak_mib(fn, device)
                except Exception as err:
                    run.write("moe", dict(tokens=n, routing=rname, impl=impl, config=config, note=repr(err)[:160]))
                    print(f"  MoE N={n} {rname} {impl} {config}: {err!r}"[:240])
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                tflops = flops / med / 1e9
                wbytes = touched * 3 * d * inter * (1 if kind == "fp8" else 2)
                run.write("moe", dict(tokens=n, routing=rname, max_violation=round(vio, 3), impl=impl, config=config,
                                      median_ms=round(med, 4), p10_ms=round(p10, 4), p90_ms=round(p90, 4),
                                      tflops=round(tflops, 1), pct_fp8_peak=round(100 * tflops / PEAK["fp8"], 1),
                                      pct_bf16_peak=round(100 * tflops / PEAK["bf16"], 1), experts_touched=touched,
                                      weight_GB_s=round(wbytes / med / 1e6, 1), peak_extra_MiB=round(mem, 1), note=""))
                print(f"  MoE N={n:<6} {rname:<6} {impl:<52} {config:<18} {med:9.3f} ms {tflops:7.1f} TFLOP/s "
                      f"{mem:8.0f} MiB")
                if impl == "triton: grouped FP8" and (best is None or med < best[0]):
                    best = (med, config)
                    best_cfg[n] = None if config == "default" else tuple(int(v) for v in config.split("x"))
            if best:
                run.write("moe", dict(tokens=n, routing=rname, impl="triton best", config=best[1],
                                      median_ms=round(best[0], 4), tflops=round(flops / best[0] / 1e9, 1)))
            if n <= 32 and rname == "gate" and device.type == "cuda" and run.time_left() > 0:
                # a decode step replays a CUDA graph: the same work without the launch gaps
                mc = kmoe.MoEConfig(*best_cfg[n]) if best_cfg.get(n) else None
                graphed = [("triton: grouped FP8, CUDA graph", lambda mc=mc: kmoe.moe_experts(
                    x, idx, wt, stacked.w13, stacked.s13, stacked.w2, stacked.s2, config=mc, check=False),
                            best[1] if best else "default"),
                           ("triton: MoE.forward (gate + grouped FP8), CUDA graph",
                            lambda xb=x.view(1, n, d): moe(xb, backend="triton"), "default")]
                for impl, fn, config in graphed:
                    try:
                        med, p10, p90 = bench(as_graph(fn, device), device, quick=quick)
                    except Exception as err:
                        run.write("moe", dict(tokens=n, routing=rname, impl=impl, config=config, note=repr(err)[:160]))
                        print(f"  MoE N={n} {impl}: {err!r}"[:240])
                        continue
                    run.write("moe", dict(tokens=n, routing=rname, max_violation=round(vio, 3), impl=impl,
                                          config=config, median_ms=round(med, 4), p10_ms=round(p10, 4),
                                          p90_ms=round(p90, 4), tflops=round(flops / med / 1e9, 1),
                                          experts_touched=touched, weight_GB_s=round(touched * 3 * d * inter / med / 1e6, 1),
                                          note="CUDA graph replay"))
                    print(f"  MoE N={n:<6} {rname:<6} {impl:<52} {config:<18} {med:9.3f} ms")
        if n == dims["stage_tokens"]:
            try:
                moe_stages(run, device, x, moe, stacked, best_cfg.get(n), quick)
            except Exception:
                run.error(f"moe stages N={n}")


def moe_stages(run: Run, device, x, moe, stacked, config, quick: bool) -> None:
    """Time each step of the grouped FP8 MoE separately (gate routing, the best config found)."""
    import torch

    from dslib.kernels import fp8
    from dslib.kernels import moe as kmoe

    n = x.shape[0]
    routing = moe.gate.route(x)
    idx = torch.cat([routing.topk_idx, routing.topk_idx.new_full((n, 1), stacked.n_routed)], 1)
    wt = torch.cat([routing.topk_weight, routing.topk_weight.new_ones(n, 1)], 1)
    cfg = kmoe.MoEConfig(*config) if config else kmoe.default_moe_config(idx.numel(), stacked.w13.shape[0])
    g = kmoe.group_by_expert(idx, wt, stacked.w13.shape[0], cfg.block_m)
    x8, sx = fp8._act_quant_2d(x)
    h8, sh = kmoe.gate_up(x8, sx, g, stacked.w13, stacked.s13, cfg)
    y_rows = kmoe.down(h8, sh, g, stacked.w2, stacked.s2, cfg, x.dtype)
    out = torch.empty_like(x)
    rows, d, inter = idx.numel(), x.shape[1], stacked.w2.shape[2]
    stages = [
        ("gate (routing, torch)", lambda: moe.gate.route(x), 0),
        ("group_by_expert (sort, tiles)", lambda: kmoe.group_by_expert(idx, wt, stacked.w13.shape[0], cfg.block_m), 0),
        ("act_quant tokens", lambda: fp8._act_quant_2d(x), 0),
        ("gate_up + SwiGLU + act_quant", lambda: kmoe.gate_up(x8, sx, g, stacked.w13, stacked.s13, cfg),
         2 * rows * d * 2 * inter),
        ("down x gate weight", lambda: kmoe.down(h8, sh, g, stacked.w2, stacked.s2, cfg, x.dtype), 2 * rows * inter * d),
        ("combine", lambda: kmoe.combine(y_rows, g.position, out), 0),
    ]
    n_tiles = int((g.tile_expert >= 0).sum())
    padded_rows = n_tiles * cfg.block_m
    for name, fn, flops in stages:
        med, p10, p90 = bench(fn, device, quick=quick)
        run.write("moe_stages", dict(tokens=n, stage=name, config="x".join(map(str, config)) if config else "default",
                                     median_ms=round(med, 4), p10_ms=round(p10, 4), p90_ms=round(p90, 4),
                                     tflops=round(flops / med / 1e9, 1) if flops else "",
                                     tile_rows_computed=padded_rows, useful_rows=rows))
        print(f"  stage N={n} {name:<32} {med:8.3f} ms" + (f" {flops / med / 1e9:7.1f} TFLOP/s" if flops else ""))


def summary(run: Run) -> str:
    lines = ["", "== summary (medians) =="]
    moe = run.rows.get("moe", [])
    best = {}
    for r in moe:
        if r.get("routing") != "gate" or "median_ms" not in r or r.get("note"):
            continue
        key = (r["tokens"], r["impl"])
        if key not in best or float(r["median_ms"]) < float(best[key]["median_ms"]):
            best[key] = r
    tokens = sorted({t for t, _ in best})
    if tokens:
        lines.append(f"{'MoE layer, gate routing':<28} {'today ms':>10} {'grouped ms':>11} {'TFLOP/s':>9} {'speed-up':>9}"
                     f" {'bf16 grp ms':>12}")
        for t in tokens:
            today = best.get((t, "torch: per-expert loop, dequantise per call (today)"))
            grp = best.get((t, "triton best")) or best.get((t, "triton: grouped FP8"))
            b16 = best.get((t, "torch._grouped_mm: grouped bf16"))
            f = lambda r, k="median_ms": f"{float(r[k]):.3f}" if r else "-"
            sp = f"{float(today['median_ms']) / float(grp['median_ms']):.1f}x" if today and grp else "-"
            lines.append(f"{'N = ' + str(t):<28} {f(today):>10} {f(grp):>11} {f(grp, 'tflops') if grp else '-':>9}"
                         f" {sp:>9} {f(b16):>12}")
        grp1 = best.get((1, "triton best")) or best.get((1, "triton: grouped FP8"))
        grp16k = best.get((16384, "triton best")) or best.get((16384, "triton: grouped FP8"))
        for t in tokens:
            for impl in ("triton: grouped FP8, CUDA graph", "triton: MoE.forward (gate + grouped FP8)",
                         "triton: MoE.forward (gate + grouped FP8), CUDA graph"):
                if (t, impl) in best:
                    lines.append(f"  N = {t:<6} {impl:<56} {float(best[(t, impl)]['median_ms']):8.3f} ms")
        if grp1:
            ms = float(grp1["median_ms"])
            lines.append(f"goal decode N = 1 in <= 1 ms (experts, eager): {ms:.3f} ms -> "
                         f"{'met' if ms <= 1 else 'NOT met'}")
        if grp16k:
            tf = float(grp16k["tflops"])
            lines.append(f"goal N = 16384 at >= 400 TFLOP/s: {tf:.0f} -> {'met' if tf >= 400 else 'NOT met'}")
    lin = [r for r in run.rows.get("fp8_linear", []) if "median_ms" in r and r.get("median_ms") not in ("", None)]
    if lin:
        lines.append(f"{'fp8_linear (TFLOP/s)':<22} {'M':>6} {'today':>8} {'scaled_mm':>10} {'triton':>8} {'bf16':>8}"
                     f" {'auto':>8}")
        for key in sorted({(r["shape"], r["M"]) for r in lin}, key=lambda s: (list(SHAPES).index(s[0]), s[1])):
            rows = [r for r in lin if (r["shape"], r["M"]) == key]
            pick = lambda name: next((f"{float(r['tflops']):.0f}" for r in rows if r["impl"].startswith(name)), "-")
            lines.append(f"{key[0]:<22} {key[1]:>6} {pick('dequantise'):>8} {pick('scaled_mm'):>10} "
                         f"{pick('triton best'):>8} {pick('bf16'):>8} {pick('auto'):>8}")
    checks = run.rows.get("checks", [])
    failed = [c for c in checks if c.get("ok") is False]
    lines.append(f"checks: {len(checks) - len(failed)} ok, {len(failed)} failed"
                 + "".join(f"\n  FAIL {c['what']} {c['shape']}: {c['value']}" for c in failed))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the CSVs")
    ap.add_argument("--quick", action="store_true", help="one case per section (< 60 s on an H200)")
    ap.add_argument("--tiny", action="store_true", help="small config on CPU under TRITON_INTERPRET=1 (checks the script)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget; later cases are skipped")
    ap.add_argument("--sections", default="checks,moe,linear", help="comma-separated subset of checks,moe,linear")
    args = ap.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from dslib.config import ModelConfig

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or use --tiny to check the script on CPU")
    budget = args.budget_s or (45 if args.quick else 90 if not args.tiny else 900)
    run = Run(Path(args.out), budget)
    t0 = time.monotonic()
    if args.tiny:
        cfg = ModelConfig.tiny(hidden_size=256, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=4, topk_group=2, n_shared_experts=1)
        dims = dict(d=256, aq_rows=64, check_shapes=["kv_a_proj_with_mqa"], check_m=[1, 33], check_tokens=[1, 16],
                    linear_shapes=["kv_a_proj_with_mqa"], linear_m=[1, 33], moe_tokens=[1, 40], moe_sweep_tokens=[40],
                    stage_tokens=40, bf16_grouped=True, probe_m=[1, 16])
        global SHAPES
        SHAPES = {"kv_a_proj_with_mqa": (576, 256), "q_a_proj": (384, 256)}
    else:
        cfg = ModelConfig.deepseek_v32()
        dims = dict(d=cfg.hidden_size, aq_rows=4096, check_shapes=["kv_a_proj_with_mqa", "q_b_proj", "o_proj"],
                    check_m=[1, 33, 4096], check_tokens=[1, 256],
                    linear_shapes=list(SHAPES), linear_m=[1, 32, 4096, 16384], probe_m=SCALED_MM_PROBE_M,
                    moe_tokens=[1, 16384, 4096, 1024, 32, 65536], moe_sweep_tokens=[1, 16384, 4096],  # goals first
                    stage_tokens=16384, bf16_grouped=True)
        if args.quick:
            dims.update(check_shapes=["kv_a_proj_with_mqa"], check_m=[1, 4096], check_tokens=[256],
                        linear_shapes=["o_proj"], linear_m=[1, 4096], moe_tokens=[1, 4096], moe_sweep_tokens=[4096],
                        stage_tokens=4096, bf16_grouped=False)
    info = env_info(device, args)
    (run.out / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    sections = set(args.sections.split(","))

    shares = {k: v * budget for k, v in dict(checks=0.2, moe=0.5, linear=0.3).items()}
    if "checks" in sections:
        run.begin("checks: fp8", shares["checks"] / 2)
        try:
            with torch.no_grad():
                checks_fp8(run, device, dims)
        except Exception:
            run.error("checks fp8")
    moe = None
    if sections & {"checks", "moe"}:
        try:
            t = time.monotonic()
            moe = random_fp8_moe(cfg, device)
            print(f"== MoE layer with random FP8 weights built in {time.monotonic() - t:.1f} s")
        except Exception:
            run.error("building the MoE layer")
    if moe is not None and "checks" in sections:
        run.begin("checks: moe", shares["checks"] / 2)
        try:
            with torch.no_grad():
                checks_moe(run, device, dims, moe, cfg)
        except Exception:
            run.error("checks moe")
    if moe is not None and "moe" in sections:  # what the checks left over goes to the MoE timings (the goals)
        run.begin("moe", 0.62 * (run.deadline - time.monotonic()) if "linear" in sections else shares["moe"])
        try:
            with torch.no_grad():
                bench_moe(run, device, dims, moe, cfg, args.quick)
        except Exception:
            run.error("bench moe")
    del moe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "linear" in sections:
        run.begin("fp8_linear", max(run.deadline - time.monotonic(), 0.0))
        try:
            with torch.no_grad():
                bench_fp8_linear(run, device, dims, args.quick)
        except Exception:
            run.error("bench fp8_linear")
    text = summary(run) + f"\n(total {time.monotonic() - t0:.0f} s; CSVs in {run.out})"
    print(text)
    (run.out / "summary.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
