"""One full-width DSA attention layer: dslib (Triton kernels, and its PyTorch path) against transformers'
`deepseek_v32` attention with the same weights, bf16, causal prefill (issue 11's "against transformers" row).

    python benchmarks/gpu_vs_transformers.py --out data/gpu_vs_transformers      # one H200, about 1 minute
    python benchmarks/gpu_vs_transformers.py --tiny --out /tmp/vt                 # the logic, small dims, CPU

transformers folds the indexer's top-k into a dense attention mask (O(L²) time and memory); dslib gathers the
selected latents (O(L·k)). Both compute the same function: the script checks the outputs agree (bf16 tolerance)
before it times anything. Writes gpu_vs_transformers.csv (one row per implementation and length).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import platform
import time
from pathlib import Path

import torch

from dslib.config import ModelConfig
from dslib.sparse import DSAttention

HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
           "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "n_group",
           "topk_group", "max_position_embeddings")


def pair(cfg: ModelConfig, device, dtype):
    """transformers' attention (SDPA) and dslib's DSAttention with the same random weights."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf
    from transformers.models.deepseek_v32.configuration_deepseek_v32 import DeepseekV32Config

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_theta": cfg.rope_theta,
                **{("rope_type" if k == "type" else k): v for k, v in cfg.rope_scaling.items()}}
    hcfg = DeepseekV32Config(**{k: getattr(cfg, k) for k in HF_KEYS}, num_hidden_layers=1, first_k_dense_replace=1,
                             rope_parameters=rope, attention_dropout=0.0)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = hf.DeepseekV32Attention(hcfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():  # weights of a trained model's size, not PyTorch's default init
            if p.dim() == 2:
                p.normal_(0.0, cfg.initializer_range)
    ours = DSAttention(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    rotary = hf.DeepseekV32RotaryEmbedding(hcfg)
    return ref.to(device, dtype), ours.to(device, dtype), rotary.to(device)


def run_hf(ref, rotary, h):
    B, T, _ = h.shape
    pos = torch.arange(T, device=h.device).unsqueeze(0).expand(B, T)
    cos_sin = rotary(h, pos)
    mask = torch.full((T, T), float("-inf"), device=h.device, dtype=h.dtype).triu(1).expand(B, 1, T, T)
    return ref(h, cos_sin, mask, position_ids=pos)[0]


def timed(fn, device, repeats):
    """Median seconds of `fn()` and the peak memory it allocated (bytes), after one warm-up run."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
    return sorted(times)[len(times) // 2], peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small dims on the CPU (checks the script)")
    ap.add_argument("--kernel-tuning", default="data/gpu_kernels/gpu_kernels_best.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        cfg = ModelConfig.tiny(index_n_heads=8, index_head_dim=16, index_topk=8, max_position_embeddings=512)
        dtype, lengths, backends = torch.float32, [64, 128], [("torch", "fp32")]
    else:
        cfg, dtype = ModelConfig.deepseek_v32(), torch.bfloat16
        lengths = [int(x) for x in args.lengths.split(",")]
        backends = [("triton", "fp32"), ("triton", "fp8"), ("torch", "fp32")]
        from dslib import kernels

        if Path(args.kernel_tuning).is_file():
            print("kernel tuning:", sorted(kernels.use_tuning(args.kernel_tuning)), flush=True)
    ref, ours, rotary = pair(cfg, device, dtype)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
               transformers=__import__("transformers").__version__,
               date=datetime.date.today().isoformat(), index_topk=cfg.index_topk)
    rows = []
    for T in lengths:
        g = torch.Generator(device=device).manual_seed(T)
        h = torch.randn(1, T, cfg.hidden_size, device=device, dtype=dtype, generator=g)
        with torch.no_grad():
            theirs = None
            try:
                theirs = run_hf(ref, rotary, h)
                sec, peak = timed(lambda: run_hf(ref, rotary, h), device, args.repeats)
                rows.append(dict(impl="transformers deepseek_v32 (sdpa, top-k as a dense mask)", context=T,
                                 median_ms=round(sec * 1e3, 3), peak_GiB=round(peak / 2**30, 2), rel_err=""))
            except torch.cuda.OutOfMemoryError as err:
                rows.append(dict(impl="transformers deepseek_v32 (sdpa, top-k as a dense mask)", context=T,
                                 median_ms="", peak_GiB="OOM", rel_err="", note=str(err)[:120]))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for backend, precision in backends:
                name = f"dslib backend={backend} indexer={'fp8' if precision == 'fp8' else 'bf16'}"
                if backend == "torch" and T > 16384 and not args.tiny:
                    continue  # its [T, S] index scores: slow at long contexts, shown at 16K
                try:
                    mine = ours(h, attention="sparse", backend=backend, precision=precision)
                    err = ""
                    if theirs is not None:
                        err = float((mine.float() - theirs.float()).norm() / theirs.float().norm())
                    sec, peak = timed(lambda: ours(h, attention="sparse", backend=backend, precision=precision),
                                      device, args.repeats)
                    rows.append(dict(impl=name, context=T, median_ms=round(sec * 1e3, 3),
                                     peak_GiB=round(peak / 2**30, 2), rel_err=err))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    rows.append(dict(impl=name, context=T, median_ms="", peak_GiB="", rel_err="",
                                     note=f"{type(exc).__name__}: {exc}"[:160]))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del theirs
        for r in rows:
            if r["context"] == T:
                err = "" if r["rel_err"] == "" else f"rel_err {r['rel_err']:.2e}"
                print(f"  L={T:>6}  {r['impl']:<58} {r['median_ms']!s:>10} ms  {r['peak_GiB']!s:>7} GiB  {err}"
                      f"{('  ' + r['note']) if r.get('note') else ''}", flush=True)
    keys = ["impl", "context", "median_ms", "peak_GiB", "rel_err", "note"] + list(env)
    with open(out / "gpu_vs_transformers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({**r, **env} for r in rows)
    by = {(r["impl"].split(" ")[0] + (" fp8" if "fp8" in r["impl"] else ""), r["context"]): r for r in rows}
    for T in lengths:
        a, b = by.get(("transformers", T)), by.get(("dslib fp8", T)) or by.get(("dslib", T))
        if a and b and a["median_ms"] != "" and b["median_ms"] != "":
            print(f"L={T}: dslib {b['median_ms']} ms vs transformers {a['median_ms']} ms -> "
                  f"{a['median_ms'] / b['median_ms']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
