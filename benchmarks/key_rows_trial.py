"""Trial on one GPU: sparse MLA prefill with the keys as the rows of the score product (variant "key_rows") against
the tuned one-pass kernel, at the 671B dims (H = 128, C = 512, R = 64, k = 2048, bf16).

Why: in the one-pass kernel the score product has the 64 heads as rows; Triton gives every warp of a product that
feeds another product to its rows, so both warpgroups compute the same q·k (1.53x the useful tensor work). With
128 keys as rows each warpgroup scores its own 64 keys, and the weighted sum, which feeds nothing, splits its
512 columns over the warpgroups (offline sm_90a report: warps 8x1 and 4x2). The price: the softmax reduces
across warps, and 128 gathered rows (144 KB) beside q (72 KB) leave no room for a second pipeline stage.

    python benchmarks/key_rows_trial.py --out data/gpu_kernels --full    # one H200, ~1-2 min
    TRITON_INTERPRET=1 python benchmarks/key_rows_trial.py --dry-run --out /tmp/kr   # the logic on CPU

Writes key_rows_trial.csv: per shape and configuration the median time (triton.testing.do_bench, L2 flushed),
TFLOP/s (REFERENCE §8.2's count: 2·H·(2C + R) per valid selected key) and the relative error against the
one-pass kernel's output.
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

CONFIGS = [
    ("one_pass", dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2)),  # the tuned prefill choice
    ("key_rows", dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=1, ACC_T=False)),
    ("key_rows", dict(BLOCK_H=64, BLOCK_N=128, num_warps=8, num_stages=1, ACC_T=True)),
    ("key_rows", dict(BLOCK_H=32, BLOCK_N=128, num_warps=8, num_stages=2, ACC_T=False)),
    ("key_rows", dict(BLOCK_H=32, BLOCK_N=64, num_warps=4, num_stages=2, ACC_T=True)),
    ("key_rows", dict(BLOCK_H=32, BLOCK_N=64, num_warps=4, num_stages=3, ACC_T=True)),
    ("key_rows", dict(BLOCK_H=32, BLOCK_N=64, num_warps=4, num_stages=2, ACC_T=False)),
]
SHAPES = [(2048, 131072), (2048, 16384)]  # (queries T at the end of a context of S tokens)
DRY = dict(dims=dict(H=16, C=32, R=16, topk=32), shapes=[(8, 64)],  # --dry-run: the logic on CPU, tiny dims
           configs=[("one_pass", dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)),
                    ("key_rows", dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, ACC_T=False)),
                    ("key_rows", dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1, ACC_T=True))])


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
            for variant, cfg in configs:
                row = dict(kernel="sparse_prefill", shape=f"T={T} S={S} k={dims['topk']}",
                           config=str({"variant": variant, **cfg}))
                try:
                    def fn(variant=variant, cfg=cfg):
                        return kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant=variant, config=cfg)
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
        if args.full and not args.dry_run:  # every query of a causal 128K prefill, each variant's best config
            S = 131072
            best = {}
            for r in rows:
                if r.get("ok") and r["shape"].endswith(f"S={S} k=2048"):
                    cfg = eval(r["config"])  # noqa: S307  (our own dict literal)
                    v = cfg.pop("variant")
                    if v not in best or r["median_ms"] < best[v][0]:
                        best[v] = (r["median_ms"], cfg)
            qa, qr, lat, kr = bench.mla_inputs(run, 1, S, S, seed=23)
            pos = torch.arange(S, device=dev)
            sel = bench.strided_selection(pos, dims["topk"], 1, seed=4)
            flop = kmla.sparse_mla_flops(sel, dims["H"], dims["C"], dims["R"])
            for v, (_, cfg) in best.items():
                kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant=v, config=cfg)
                torch.cuda.synchronize()
                times = []
                for _ in range(3):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant=v, config=cfg)
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b))
                times.sort()
                rows.append(dict(kernel="sparse_prefill_full", shape=f"T={S} S={S} k=2048 (causal)",
                                 config=str({"variant": v, **cfg}), ok=True, median_ms=round(times[1], 2),
                                 lo_ms=round(times[0], 2), hi_ms=round(times[2], 2),
                                 tflops=round(flop / times[1] / 1e9, 1), **meta))
                print(rows[-1], flush=True)
    fields = ["kernel", "shape", "config", "ok", "rel_err", "median_ms", "lo_ms", "hi_ms", "tflops", "error",
              *meta]
    with open(args.out / "key_rows_trial.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
