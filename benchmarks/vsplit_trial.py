"""Trial on one GPU: sparse MLA prefill with the value columns split over two programs of one warpgroup (config
VSPLIT = 2) against the tuned one-pass kernel (one program of two warpgroups per 64 heads), at the 671B dims
(H = 128, C = 512, R = 64, k = 2048, bf16).

Why: the tuned kernel needs 221 KB of shared memory and all 64K registers, so one program runs per SM, and ncu
finds a warp ready to issue in only 29% of cycles (data/gpu_kernels/ncu_sparse_mla.txt): its softmax and its
products wait on each other. With VSPLIT = 2 a program keeps [64 heads, 256 columns] of the accumulator (128
registers per thread in one warpgroup) and needs 108 KB (offline sm_90a report, benchmarks/kernel_resources.py),
so two programs share an SM and one's softmax can overlap the other's products. The price: both halves still
score with all 576 columns, so each query's rows are gathered by four programs instead of two (more L2 traffic),
and the duplicated score product stays (each half computes it, as the two warpgroups do now).

    python benchmarks/vsplit_trial.py --out DIR --full    # one GPU, ~1-2 min
    TRITON_INTERPRET=1 python benchmarks/vsplit_trial.py --dry-run --out /tmp/vs   # the logic on CPU

Writes vsplit_trial.csv: per shape and configuration the median time (triton.testing.do_bench), TFLOP/s
(REFERENCE §8.2's count: 2·H·(2C + R) per valid selected key) and the relative error against the tuned kernel.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_kernels as bench  # noqa: E402  (its input generators: the same data as the sweep)
import triton  # noqa: E402

from dslib.kernels import sparse_mla as kmla  # noqa: E402


def cfg(h, n, warps, stages, vsplit=1):
    return dict(BLOCK_H=h, BLOCK_N=n, num_warps=warps, num_stages=stages, VSPLIT=vsplit)


CONFIGS = [cfg(64, 64, 8, 2), cfg(64, 32, 8, 3),  # the tuned prefill choice (first: the reference), the default
           cfg(64, 32, 4, 1, 2), cfg(64, 16, 4, 2, 2), cfg(64, 32, 4, 2, 2), cfg(64, 16, 4, 1, 2)]
SHAPES = [(2048, 131072), (2048, 16384)]  # (queries T at the end of a context of S tokens)
DRY = dict(dims=dict(H=16, C=32, R=16, topk=32), shapes=[(8, 64)],  # --dry-run: the logic on CPU, tiny dims
           configs=[cfg(16, 16, 4, 1), cfg(16, 16, 4, 1, 2)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--full", action="store_true", help="also every query of a 128K prefill, best of each variant")
    ap.add_argument("--dry-run", action="store_true", help="tiny dims on CPU (with TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.dry_run else "cuda")
    dims = DRY["dims"] if args.dry_run else dict(H=128, C=512, R=64, topk=2048)
    shapes, configs = (DRY["shapes"], DRY["configs"]) if args.dry_run else (SHAPES, CONFIGS)
    run = argparse.Namespace(dims=dims, device=dev)
    scale = 192 ** -0.5
    meta = dict(device="cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(dev),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat())
    rows = []
    with torch.no_grad():
        for T, S in shapes:
            qa, qr, lat, kr = bench.mla_inputs(run, 1, T, S, seed=23)
            pos = torch.arange(S - T, S, device=dev)
            sel = bench.strided_selection(pos, dims["topk"], 1, seed=4)
            flop = kmla.sparse_mla_flops(sel, dims["H"], dims["C"], dims["R"])
            ref = None
            for c in configs:
                row = dict(kernel="sparse_prefill", shape=f"T={T} S={S} k={dims['topk']}", config=str(c))
                try:
                    def fn(c=c):
                        return kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="one_pass", config=c)
                    out = fn()
                    if ref is None:  # the first configuration (the tuned one-pass kernel) is the reference
                        ref = out.float()
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    ms = [0.0] * 3 if args.dry_run else \
                        triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.1, 0.9])
                    row.update(ok=err < 1e-2, rel_err=round(err, 5), median_ms=round(ms[0], 4),
                               lo_ms=round(ms[1], 4), hi_ms=round(ms[2], 4),
                               tflops=round(flop / ms[0] / 1e9, 1) if ms[0] else None)
                except Exception as e:  # noqa: BLE001  (a config that does not compile is a result too)
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append({**row, **meta})
                print(rows[-1], flush=True)
            del qa, qr, lat, kr, sel, ref
            if not args.dry_run:
                torch.cuda.empty_cache()
        if args.full and not args.dry_run:  # every query of a causal 128K prefill, best config of each VSPLIT
            S = 131072
            best = {}
            for r in rows:
                if r.get("ok") and r["shape"].endswith(f"S={S} k=2048"):
                    c = eval(r["config"])  # noqa: S307  (our own dict literal)
                    v = c["VSPLIT"]
                    if v not in best or r["median_ms"] < best[v][0]:
                        best[v] = (r["median_ms"], c)
            qa, qr, lat, kr = bench.mla_inputs(run, 1, S, S, seed=23)
            pos = torch.arange(S, device=dev)
            sel = bench.strided_selection(pos, dims["topk"], 1, seed=4)
            flop = kmla.sparse_mla_flops(sel, dims["H"], dims["C"], dims["R"])
            for _, c in best.values():
                kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="one_pass", config=c)
                torch.cuda.synchronize()
                times = []
                for _ in range(3):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="one_pass", config=c)
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                times.sort()
                rows.append(dict(kernel="sparse_prefill_full", shape=f"T={S} S={S} k=2048 (causal)",
                                 config=str(c), ok=True, median_ms=round(times[1], 2),
                                 lo_ms=round(times[0], 2), hi_ms=round(times[2], 2),
                                 tflops=round(flop / times[1] / 1e9, 1), **meta))
                print(rows[-1], flush=True)
    fields = ["kernel", "shape", "config", "ok", "rel_err", "median_ms", "lo_ms", "hi_ms", "tflops", "error",
              *meta]
    with open(args.out / "vsplit_trial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
