"""Does the order of a query's selected keys change what sparse MLA costs? (one H200, full width)

The sparse MLA kernel walks a query's selected keys in the order the top-k gives them. torch.topk (unsorted)
gives them in no particular order; the radix select (`dslib.kernels.topk`) gives increasing positions. With the
keys in position order, the programs running at the same time read neighbouring parts of the latent cache, which
may keep more of it in L2. This measures DSA prefill (FP8 indexer + top-k + sparse MLA) both ways, and a
torch.topk selection sorted by position afterwards, at a few context lengths.

    python benchmarks/selection_order_probe.py --out data/gpu_kernels    # ~1 min on one H200
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as bench  # noqa: E402

from dslib.kernels import indexer as kidx  # noqa: E402
from dslib.kernels import sparse_mla as kmla  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", default="131072,65536,32768,16384")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    run = bench.Run(args.out, "full", dev, bench.FULL_DIMS, budget_s=600)
    d = run.dims
    scale = d["d_qk"] ** -0.5
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        with torch.no_grad():
            pos = torch.arange(L, device=dev)
            q, w, k = bench.indexer_inputs(run, 1, L, L, seed=L)
            qa, qr, lat, kr = bench.mla_inputs(run, 1, L, L, seed=L + 1)
            flops = bench.mla_flops(run, bench.causal_pairs(pos, k=d["topk"]))

            def select(method):
                return kidx.index_topk(q, w, k, pos, d["topk"], fp8=True, sorted=False, method=method,
                                       score_dtype=torch.bfloat16)

            def attend(sel):
                return kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="one_pass",
                                       config=dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2))

            sel_torch, sel_radix = select("torch"), select("radix")
            same = (sel_torch.sort(-1).values == sel_radix.sort(-1).values).all(-1).float().mean().item()
            sel_sorted = sel_torch.sort(-1).values
            cases = {
                "index_topk torch bf16": lambda: select("torch"),
                "index_topk radix bf16": lambda: select("radix"),
                "sort selection by position": lambda: sel_torch.sort(-1),
                "sparse_mla, torch.topk order": lambda: attend(sel_torch),
                "sparse_mla, radix order (positions)": lambda: attend(sel_radix),
                "sparse_mla, torch.topk sorted by position": lambda: attend(sel_sorted),
                "dsa core torch.topk": lambda: attend(select("torch")),
                "dsa core radix": lambda: attend(select("radix")),
                "dsa core torch.topk + sort": lambda: attend(select("torch").sort(-1).values),
            }
            for name, fn in cases.items():
                t = bench.measure(fn, run)
                tf = flops / t["median_ms"] / 1e9 if name.startswith(("sparse", "dsa")) else None
                print(f"L={L:>6} {name:44s} {t['median_ms']:9.2f} ms" + (f"  {tf:6.1f} TFLOP/s (sparse part's FLOPs)"
                      if tf else ""), flush=True)
                rows.append(dict(context=L, case=name, median_ms=round(t["median_ms"], 3),
                                 sparse_tflops=round(tf, 1) if tf else "", same_sets_torch_radix=round(same, 4),
                                 **run.env))
        bench.free()  # (the next, shorter context rebinds the tensors; lengths run longest first)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "selection_order.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
