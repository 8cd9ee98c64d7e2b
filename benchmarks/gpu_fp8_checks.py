"""Two GPU checks behind tests/test_gpu_backends.py (one H200, 2026-12-03), printed as a log:

  cuBLAS by K   torch._scaled_mm (block-scaled FP8, what fp8_linear uses for 16+ tokens) against the fp32
                emulation of the same maths, for in_features K = 128 .. 2048, with the activation scales in the
                column-major layout fp8_linear passes and, for comparison, row-major; then fp8_linear's own choice
                (which checks cuBLAS once per weight shape). cuBLAS gave relative errors of ~11 for K = 256.
  MoE tiles     the grouped FP8 MoE kernels at ~160-256 rows per expert with 16-, 64- and 128-row tiles against
                their fp32 emulation, output and per-row intermediate (the tiles a prefill uses).

    python benchmarks/gpu_fp8_checks.py | tee data/gpu_fp8_checks.txt
"""
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dslib.checkpoint import dequantize_fp8_blocks, quantize_fp8_blocks  # noqa: E402
from dslib.kernels import fp8  # noqa: E402
from dslib.kernels import moe as kmoe  # noqa: E402

dev = "cuda"


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def stacked(e, d, inter, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q13 = [quantize_fp8_blocks(torch.randn(2 * inter, d, generator=g, device=dev) * 0.05) for _ in range(e)]
    q2 = [quantize_fp8_blocks(torch.randn(d, inter, generator=g, device=dev) * 0.05) for _ in range(e)]
    return (torch.stack([a for a, _ in q13]), torch.stack([b for _, b in q13]),
            torch.stack([a for a, _ in q2]), torch.stack([b for _, b in q2]))


def routing(n, e_routed, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e_routed, generator=g)[:k] for _ in range(n)])
    idx = torch.cat([idx, torch.full((n, 1), e_routed)], 1)  # shared expert
    wt = torch.cat([torch.rand(n, k, generator=g), torch.ones(n, 1)], 1)
    return idx.to(dev), wt.to(dev)


def moe_case(d, inter, e_routed, n, k):
    print(f"== grouped MoE d={d} I={inter} E={e_routed}+1 N={n} k={k}+1 "
          f"(~{n * k / e_routed:.0f} rows/routed expert)", flush=True)
    w13, s13, w2, s2 = stacked(e_routed + 1, d, inter)
    idx, wt = routing(n, e_routed, k)
    x = (torch.randn(n, d, device=dev)).to(torch.bfloat16)
    emul = kmoe.moe_experts_torch(x.float(), idx, wt, w13, s13, w2, s2)
    plain = kmoe.moe_experts_torch(x.float(), idx, wt, w13, s13, w2, s2, quantize=False)
    print(f"  emulation vs no-act-quant: {rel(emul, plain):.3e}")
    for c in [(16, 4, 4, 64, 4, 4), (64, 4, 3, 128, 4, 4), (128, 8, 3, 128, 8, 4), (128, 4, 3, 128, 4, 4),
              (64, 8, 3, 128, 8, 4), (128, 8, 1, 128, 8, 1), (64, 4, 1, 64, 4, 1)]:
        try:
            cfg = kmoe.MoEConfig(*c)
            y = kmoe.moe_experts(x, idx, wt, w13, s13, w2, s2, config=cfg)
            torch.cuda.synchronize()
            # stage by stage
            g = kmoe.group_by_expert(idx, wt, w13.shape[0], cfg.block_m)
            x8, sx = fp8._act_quant_2d(x)
            h8, sh = kmoe.gate_up(x8, sx, g, w13, s13, cfg)
            h = fp8.dequantize_act(h8, sh)
            xs = fp8.dequantize_act(x8, sx)[g.row_token.long()]
            ex = torch.searchsorted(g.bounds[1:], torch.arange(len(g.row_token), device=dev), right=True)
            href = torch.empty_like(h)
            for e in ex.unique().tolist():
                r = (ex == e).nonzero().squeeze(1)
                wg = dequantize_fp8_blocks(w13[e], s13[e], torch.float32)
                gg, uu = xs[r] @ wg[:inter].T, xs[r] @ wg[inter:].T
                href[r] = torch.nn.functional.silu(gg) * uu
            bad_rows = ((h - href).norm(dim=1) > 0.05 * href.norm(dim=1)).nonzero().squeeze(1)
            print(f"  cfg {c}: out rel {rel(y, emul):.3e}; gate_up h rel {rel(h, href):.3e}, "
                  f"bad rows {len(bad_rows)}/{len(h)} first {bad_rows[:8].tolist()}", flush=True)
        except Exception:
            traceback.print_exc()


def linear_case():
    print("== scaled_mm by K (unpadded M=64), rel to the fp32 emulation; then row-major scale_a", flush=True)
    for n_out in (512, 7168):
        line = []
        for k_in in (128, 256, 384, 512, 640, 768, 1024, 1536, 2048):
            w8, ws = quantize_fp8_blocks(torch.randn(n_out, k_in, device=dev) * 0.05)
            x = torch.randn(64, k_in, device=dev).to(torch.bfloat16)
            ref = fp8.dequantize_act(*fp8.act_quant_torch(x.float())) @ dequantize_fp8_blocks(w8, ws).T
            x8, sx = fp8._act_quant_2d(x, col_major_scale=True)
            try:
                a = rel(fp8.scaled_mm(x8, sx, w8, ws), ref)
            except Exception as err:
                a = str(err)[:30]
            try:
                b = rel(fp8.scaled_mm(x8, sx.contiguous(), w8, ws), ref)
            except Exception as err:
                b = str(err)[:30]
            auto = rel(fp8.fp8_linear(x, w8, ws), ref)
            line.append(f"K={k_in}: {a:.1e}/{b if isinstance(b, str) else f'{b:.1e}'} auto {auto:.1e}"
                        if isinstance(a, float) else f"K={k_in}: {a}")
        print(f"  N={n_out}: " + "; ".join(line), flush=True)
    print("  refused:", fp8._SCALED_MM_REFUSED, flush=True)


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for f in (linear_case, lambda: moe_case(512, 256, 32, 640, 8), lambda: moe_case(7168, 2048, 16, 512, 8)):
        try:
            f()
        except Exception:
            traceback.print_exc()
