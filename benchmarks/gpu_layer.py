"""One full-size DeepSeek-V3.2 decoder layer on one GPU: dense MLA vs DSA attention, and the MoE block (chapter 5).

Synthetic weights with the 671B model's exact shapes come from `dslib.checkpoint.RandomSource` (FP8 blocks,
generated on the GPU) and are dequantised to bf16 by `dslib.checkpoint.load_layer`, the same code that loads a
real checkpoint. Then, with dslib's own PyTorch code (no FlashMLA / DeepGEMM kernels):

  attention prefill (batch 1, T = L tokens, no cache)
      dense_naive   dslib MLA in MHA mode, full score matrix (only while [128, L, L] fits)
      dense_sdpa    the same MHA-mode maths through torch's fused scaled_dot_product_attention (causal)
      sparse        dslib DSA: lightning indexer (chunked) + top-2048 + gather-based MQA-mode attention
      indexer       the indexer scores alone (part of `sparse`)
  attention decode (one new token per sequence over a cache of L tokens; batch 1 and 16)
      dense_absorbed, dense_naive (re-expands the cache every step, as transformers does), sparse
  moe / dense_mlp   the MoE block (256 routed + 1 shared expert, 8 per token) and the dense FFN of layers 0-2
                    for N tokens

Writes gpu_attention.csv and gpu_moe.csv under --out. Self-checks: outputs finite; sparse == dense and
sdpa == naive where they must agree (L <= index_topk); MoE == the per-token reference on a few tokens.
A --budget-s wall-clock budget skips the remaining cases (recorded as skipped) so a run stays under ~8 minutes.

    python benchmarks/gpu_layer.py --out data/                # on one H200 (about 3-6 minutes)
    python benchmarks/gpu_layer.py --tiny --out /tmp/gpu      # the same logic on CPU with a small config
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dslib.checkpoint import RandomSource, load_layer, load_pretrained  # noqa: E402
from dslib.config import ModelConfig  # noqa: E402
from dslib.cost import wall_seconds  # noqa: E402
from dslib.devices import module_bytes  # noqa: E402
from dslib.moe import moe_reference  # noqa: E402
from dslib.sparse import DSACache  # noqa: E402

# naive_*_max: the MHA-mode paths materialise [H, T, S] scores (prefill) or per-head K/V of the whole cache
# (decode, B*L tokens), so they only run up to these sizes.
FULL = dict(prefill=[2048, 4096, 8192, 16384, 32768, 65536], decode=[2048, 8192, 32768, 131072],
            decode_batch=[1, 16], moe_tokens=[1, 16, 128, 1024, 4096, 16384], naive_prefill_max=8192,
            naive_decode_max=32768)
TINY = dict(prefill=[8, 32], decode=[8, 32], decode_batch=[1, 2], moe_tokens=[1, 16],
            naive_prefill_max=32, naive_decode_max=64)


# --------------------------------------------------------------------------------------------- timing
TARGET_S = 0.5  # seconds of repetitions per case (after one warm-up and one probe)


def timed(fn, device, *, max_reps: int = 50, min_reps: int = 3):
    """(first output, median seconds, reps) of fn(): one warm-up (its output is what the checks use), one probe,
    then enough repetitions for ~TARGET_S (min_reps..max_reps), all through `dslib.cost.wall_seconds`."""
    out = fn()
    first = wall_seconds(fn, repeats=1, warmup=0)
    reps = max(min_reps, min(max_reps, int(TARGET_S / max(first, 1e-6))))
    return out, wall_seconds(fn, repeats=reps, warmup=0), reps


def check_finite(name: str, t: torch.Tensor) -> None:
    assert torch.isfinite(t).all(), f"{name}: output has NaN/inf"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


# --------------------------------------------------------------------------------------------- attention
def dense_sdpa(attn, h: torch.Tensor) -> torch.Tensor:
    """Causal MHA-mode MLA via torch's fused attention (V zero-padded to the q/k head size so the flash kernel
    applies); the dense baseline an engine would use for prefill. h [B, T, d] -> [B, T, d]."""
    B, T, _ = h.shape
    _, q_nope, q_rope, kv_latent, k_rope, _ = attn._project(h, torch.arange(T, device=h.device))
    k, v = attn.expand_kv(kv_latent, k_rope)  # [B, T, H, 192], [B, T, H, 128]
    q = torch.cat([q_nope, q_rope], dim=-1)
    pad = q.shape[-1] - v.shape[-1]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, pad)).transpose(1, 2), is_causal=True,
        scale=attn.softmax_scale,
    )[..., : v.shape[-1]]  # [B, H, T, v]
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def indexer_only(attn, h: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(h.shape[1], device=h.device)
    q_latent, _, _, _, _, (cos, sin) = attn._project(h, positions)
    return attn.indexer(h, q_latent, cos, sin, positions)


def filled_cache(cfg: ModelConfig, batch: int, length: int, device, dtype, extra: int) -> DSACache:
    """A DSACache holding `length` tokens of random (normalised-looking) latents, rope keys and indexer keys."""
    cache = DSACache(max_len=length + extra)
    g = torch.Generator(device=device).manual_seed(length)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    cache.append(rnd(batch, length, cfg.kv_lora_rank), rnd(batch, length, cfg.qk_rope_head_dim),
                 rnd(batch, length, cfg.index_head_dim))
    return cache


def bench_attention(attn, cfg, sizes, device, dtype, deadline, rows, env):
    d, k = cfg.hidden_size, cfg.index_topk
    g = torch.Generator(device=device).manual_seed(0)

    def add(phase, variant, context, batch, seconds, reps, note=""):
        row = dict(phase=phase, variant=variant, context=context, batch=batch,
                   median_ms=None if seconds is None else round(seconds * 1e3, 4), reps=reps, note=note, **env)
        if seconds is not None:
            tokens = batch * (context if phase == "prefill" else 1)
            row["tokens_per_s"] = round(tokens / seconds, 1)
        rows.append(row)
        print(f"  {phase:7s} {variant:15s} L={context:>7d} B={batch:>2d}  "
              + ("skipped: " + note if seconds is None else f"{seconds * 1e3:10.3f} ms  {note}"), flush=True)

    with torch.no_grad():
        for L in sizes["prefill"]:
            h = (torch.randn(1, L, d, generator=g, device=device) * 0.5).to(dtype)
            variants = ["sparse", "indexer", "dense_sdpa"]
            variants += ["dense_naive"] if L <= sizes["naive_prefill_max"] else []
            outs = {}
            for variant in variants:
                if time.perf_counter() > deadline:
                    add("prefill", variant, L, 1, None, 0, "time budget spent")
                    continue
                fn = {"sparse": lambda: attn(h, attention="sparse"),
                      "indexer": lambda: indexer_only(attn, h),
                      "dense_sdpa": lambda: dense_sdpa(attn, h),
                      "dense_naive": lambda: attn(h, attention="dense", mode="naive")}[variant]
                try:
                    out, sec, reps = timed(fn, device)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    add("prefill", variant, L, 1, None, 0, "out of memory")
                    continue
                if variant != "indexer":
                    check_finite(f"prefill {variant} L={L}", out)
                    outs[variant] = out
                add("prefill", variant, L, 1, sec, reps)
                del out
            if "dense_naive" in outs and "dense_sdpa" in outs:
                err = rel_err(outs["dense_sdpa"], outs["dense_naive"])
                assert err < 3e-2, f"dense_sdpa differs from dslib's dense path at L={L}: rel err {err:.3g}"
            if L <= k and "dense_sdpa" in outs and "sparse" in outs:
                err = rel_err(outs["sparse"], outs["dense_sdpa"])
                assert err < 3e-2, f"L={L} <= index_topk: sparse must equal dense, rel err {err:.3g}"
            h = outs = None  # free this length's tensors before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()

        for B in sizes["decode_batch"]:
            for L in sizes["decode"]:
                h1 = (torch.randn(B, 1, d, generator=g, device=device) * 0.5).to(dtype)
                variants = ["sparse", "dense_absorbed"]
                variants += ["dense_naive"] if B * L <= sizes["naive_decode_max"] else []
                for variant in variants:
                    if time.perf_counter() > deadline:
                        add("decode", variant, L, B, None, 0, "time budget spent")
                        continue
                    cache = filled_cache(cfg, B, L, device, dtype, extra=64)
                    att, mode = {"sparse": ("sparse", "absorbed"), "dense_absorbed": ("dense", "absorbed"),
                                 "dense_naive": ("dense", "naive")}[variant]
                    # each call appends its token: the cache grows by one per repetition (<= 51 tokens)
                    fn = lambda: attn(h1, cache=cache, attention=att, mode=mode)  # noqa: E731
                    try:
                        out, sec, reps = timed(fn, device, max_reps=50)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        add("decode", variant, L, B, None, 0, "out of memory")
                        continue
                    check_finite(f"decode {variant} L={L}", out)
                    add("decode", variant, L, B, sec, reps)
                    cache = out = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        # decode with a cache shorter than index_topk: the selection is every key, so sparse == dense
        short = max(1, k // 2)  # + the new token: still <= k keys
        h1 = (torch.randn(2, 1, d, generator=g, device=device) * 0.5).to(dtype)
        a = attn(h1, cache=filled_cache(cfg, 2, short, device, dtype, 1), attention="sparse")
        b = attn(h1, cache=filled_cache(cfg, 2, short, device, dtype, 1), attention="dense")
        assert rel_err(a, b) < 3e-2, f"decode over {short} <= index_topk keys: sparse must equal dense"


# --------------------------------------------------------------------------------------------- MoE
def bench_ffn(layer, dense_layer, cfg, sizes, device, dtype, deadline, rows, env):
    d = cfg.hidden_size
    expert_bytes = 3 * d * cfg.moe_intermediate_size * torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        x = (torch.randn(1, 4, d, generator=g, device=device) * 0.5).to(dtype)
        err = rel_err(layer.mlp(x), moe_reference(layer.mlp, x))
        assert err < 2e-2, f"batched MoE differs from the per-token reference: rel err {err:.3g}"
        for block, name in ((layer.mlp, "moe"), (dense_layer.mlp, "dense_mlp")):
            for n in sizes["moe_tokens"]:
                if time.perf_counter() > deadline:
                    rows.append(dict(block=name, tokens=n, median_ms=None, note="time budget spent", **env))
                    continue
                x = (torch.randn(1, n, d, generator=g, device=device) * 0.5).to(dtype)
                touched = None
                if name == "moe":
                    idx, _ = block.gate(x)
                    touched = int(torch.unique(idx).numel())
                out, sec, reps = timed(lambda: block(x), device)
                check_finite(f"{name} N={n}", out)
                if name == "moe":
                    flops = 2 * n * 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
                    weight_bytes = (touched + cfg.n_shared_experts) * expert_bytes
                else:
                    flops = 2 * n * 3 * d * cfg.intermediate_size
                    weight_bytes = 3 * d * cfg.intermediate_size * torch.empty((), dtype=dtype).element_size()
                rows.append(dict(block=name, tokens=n, median_ms=round(sec * 1e3, 4), reps=reps,
                                 experts_touched=touched, tflops=round(flops / sec / 1e12, 3),
                                 weight_GB_per_s=round(weight_bytes / sec / 1e9, 1), note="", **env))
                print(f"  {name:9s} N={n:>6d}  {sec * 1e3:9.3f} ms  {flops / sec / 1e12:7.2f} TFLOP/s  "
                      f"weights {weight_bytes / sec / 1e9:7.1f} GB/s"
                      + (f"  experts touched {touched}" if touched else ""),
                      flush=True)


# --------------------------------------------------------------------------------------------- whole model
def check_small_model_on_device(device) -> float:
    """The same synthetic FP8 checkpoint of a small config, loaded on the CPU and on `device` (fp32, exact
    matmuls), gives the same logits and greedy tokens: the loader's device path works. Returns the max |diff|."""
    if device.type == "cpu":
        return 0.0
    cfg = ModelConfig.small(index_n_heads=16)
    source = RandomSource(cfg, seed=7, fp8=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_cpu = load_pretrained(source, "cpu", progress=False)
        on_dev = load_pretrained(source, device, progress=False)
        ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((on_dev(ids.to(device)).cpu() - on_cpu(ids)).abs().max())
            same = torch.equal(on_dev.generate(ids.to(device), 8).cpu(), on_cpu.generate(ids, 8))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert diff < 1e-3 and same, (f"small model on {device} differs from CPU: max |logit diff| {diff:.3g}, "
                                  f"same tokens {same}")
    print(f"small model on {device} == on CPU (max |logit diff| {diff:.2e}, same greedy tokens)", flush=True)
    return diff


# --------------------------------------------------------------------------------------------- main
def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("wrote", path)


def main(argv=None) -> None:
    threads = torch.get_num_threads()
    try:
        run(argv)
    finally:
        torch.set_num_threads(threads)


def run(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_attention.csv and gpu_moe.csv")
    ap.add_argument("--tiny", action="store_true", help="small config on CPU (tests the logic)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls exact (the indexer runs in fp32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    global TARGET_S
    TARGET_S = 0.01 if args.tiny else 0.5
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls: one thread avoids contention on a shared CPU
        cfg, sizes, dtype = ModelConfig.tiny(index_n_heads=8, index_topk=8), TINY, torch.float32
    else:
        cfg, sizes, dtype = ModelConfig.deepseek_v32(), FULL, torch.bfloat16
        if device.type != "cuda":
            print("warning: full-size layers on CPU are very slow; use --tiny to test the logic", flush=True)
    # The deployed indexer runs in FP8; dslib's runs in fp32. TF32 tensor cores are the closer stand-in on a GPU.
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    env = dict(device=gpu, torch=torch.__version__, dtype=str(dtype).removeprefix("torch."),
               config="tiny" if args.tiny else "671B", index_topk=cfg.index_topk,
               indexer_matmul="fp32" if args.no_tf32 or device.type != "cuda" else "tf32")
    print(f"{env['config']} config on {gpu} ({device}), torch {torch.__version__}", flush=True)

    check_small_model_on_device(device)
    # One MoE layer (index first_k_dense_replace) and one dense layer, through the checkpoint loading code.
    source = RandomSource(cfg, seed=args.seed, fp8=True, device=device)
    moe_idx = cfg.first_k_dense_replace
    t0 = time.perf_counter()
    layer = load_layer(source, moe_idx, device, dtype)
    dense_layer = load_layer(source, 0, device, dtype)
    params = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    expected = module_bytes(cfg, "bf16" if dtype == torch.bfloat16 else "fp32")[f"model.layers.{moe_idx}"]
    assert params == expected, f"layer holds {params} bytes, the tensor table says {expected}"
    for name, t in layer.state_dict().items():
        check_finite(f"weight {name}", t)
    print(f"loaded layers {moe_idx} (MoE, {params / 1e9:.2f} GB {env['dtype']}) and 0 (dense) from FP8 blocks in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    attn_rows: list[dict] = []
    moe_rows: list[dict] = []
    try:
        bench_attention(layer.self_attn, cfg, sizes, device, dtype, deadline, attn_rows, env)
        bench_ffn(layer, dense_layer, cfg, sizes, device, dtype, deadline, moe_rows, env)
    finally:  # whatever was measured is kept
        if attn_rows:
            write_csv(out / "gpu_attention.csv", attn_rows)
        if moe_rows:
            write_csv(out / "gpu_moe.csv", moe_rows)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
