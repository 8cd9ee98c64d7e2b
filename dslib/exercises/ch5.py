"""Exercise checks of chapter 5 (the full model and its checkpoint format).

1. `check_dequantize(fn)`: turn an e4m3 weight and its 128x128 `weight_scale_inv` blocks back into numbers,
   including a weight whose rows are not a multiple of 128 (like kv_a_proj_with_mqa's 576).
2. `check_scale_bytes(answer)`: how many bytes all `weight_scale_inv` tensors of the 671B FP8 checkpoint take
   (the 61 inference layers, embeddings and head; no MTP layer).
3. `check_gpus_needed(answer, storage)`: the fewest H200s (150.75 GB each as they report, 10% kept free) that hold
   the weights (FP8 or bf16) when every layer must sit whole on one GPU.
"""
from __future__ import annotations

import math

import torch

from dslib.checkpoint import FP8_DTYPE, SCALE_SUFFIX, checkpoint_tensors, dequantize_fp8_blocks, quantize_fp8_blocks
from dslib.config import H200_MEMORY_BYTES, ModelConfig
from dslib.devices import gpus_needed, module_bytes
from dslib.exercises import Verdict, attempt_own, correct, fresh_generator, not_yet

__all__ = [
    "check_dequantize", "check_scale_bytes", "check_gpus_needed",
    "solution_dequantize", "solution_scale_bytes", "solution_gpus_needed", "H200_MEASURED",
]

H200_MEASURED = H200_MEMORY_BYTES  # bytes one H200 reports (143,771 MiB), the series' one H200 constant


# ---------------------------------------------------------------------------------------------------- 1
def solution_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """W[i, j] = float(q[i, j]) * scale_inv[i // block, j // block] (fp32), cropped to q's shape."""
    rows, cols = q.shape
    scale = scale_inv.repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :cols]
    return q.float() * scale


_DEQUANT_HINT = ("Start by expanding the scale grid to one scale per weight: scale_inv.repeat_interleave(128, dim=0) "
                 "and then dim=1, cropped to q's shape.")


def check_dequantize(fn) -> Verdict:
    """Build it: fn(q [out, in] float8_e4m3fn, scale_inv [ceil(out/128), ceil(in/128)] fp32) -> W [out, in] fp32,
    compared with `dslib.checkpoint.dequantize_fp8_blocks` on fresh random weights: whole blocks, a partial row
    block (576 rows, like kv_a_proj_with_mqa) and a partial column block."""
    from dslib import checkpoint

    g = fresh_generator()
    for shape in ((256, 384), (576, 256), (128, 300)):
        w = torch.randn(shape, generator=g) * torch.rand(1, shape[1], generator=g) * 3  # columns of different scales
        w = w * torch.rand(shape[0], 1, generator=g) * 2  # and rows
        q, s = quantize_fp8_blocks(w)
        got, err = attempt_own(fn, q.clone(), s.clone(), modules=(checkpoint,), stub_hint=_DEQUANT_HINT)
        if err is not None:
            return err
        if not isinstance(got, torch.Tensor):
            return not_yet(f"it should return a tensor, got {type(got).__name__}.")
        if tuple(got.shape) != shape:
            partial = shape[0] % 128 or shape[1] % 128
            hint = (" The scale grid covers whole 128x128 blocks: expand it, then crop it to the weight's shape "
                    "(576 rows = 4 full blocks + one block of 64 rows)." if partial else "")
            return not_yet(f"for a weight of shape {list(shape)} the result has shape {list(got.shape)}.{hint}")
        want = dequantize_fp8_blocks(q, s)
        got = got.float()
        if torch.allclose(got, want, rtol=1e-6, atol=0):
            continue
        rows, cols = shape
        full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        tiled = s.repeat(128, 128)[:rows, :cols]
        if torch.allclose(got, q.float() / full, rtol=1e-5):
            return not_yet("you divided by weight_scale_inv. Despite its name it is MULTIPLIED: it stores "
                           "amax/448, the factor that takes e4m3 values back to the weight's range.")
        if torch.allclose(got, q.float(), rtol=1e-6):
            return not_yet("the result is the raw e4m3 values: multiply each 128x128 block by its scale.")
        if torch.allclose(got, q.float() * tiled, rtol=1e-6):
            return not_yet("`repeat` tiles the whole scale grid over the weight; each scale must cover one 128x128 "
                           "block of neighbouring weights: use repeat_interleave(128, dim) on both dimensions.")
        if torch.allclose(got, q.float() * s[:, :1].repeat_interleave(128, 0)[:rows], rtol=1e-6):
            return not_yet("every row uses the scale of its first column block; the scale changes every 128 "
                           "columns too: scale_inv[i // 128, j // 128].")
        return not_yet(f"the values differ from float(q) * scale_inv[i // 128, j // 128] for a {list(shape)} "
                       "weight; check which block each row and column falls in.")
    return correct("every 128x128 block is multiplied by its own scale; the partial last block of a 576-row "
                   "weight uses the scale computed from its 64 real rows. Compare with dslib's version below.",
                   compare=(dequantize_fp8_blocks,))


# ---------------------------------------------------------------------------------------------------- 2
def solution_scale_bytes(cfg: ModelConfig | None = None) -> int:
    """Bytes of every weight_scale_inv of the FP8 checkpoint (inference layers only), from the tensor table."""
    cfg = cfg or ModelConfig.deepseek_v32()
    return sum(s.nbytes for n, s in checkpoint_tensors(cfg, fp8=True).items() if n.endswith(SCALE_SUFFIX))


def check_scale_bytes(answer) -> Verdict:
    """answer: the number of bytes (int) of all weight_scale_inv tensors of the 671B checkpoint, MTP excluded."""
    if answer is None:
        return not_yet("no answer yet: set `answer` to a number of bytes.")
    try:
        value = int(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a number of bytes, got {answer!r}.")
    cfg = ModelConfig.deepseek_v32()
    want = solution_scale_bytes(cfg)
    table = checkpoint_tensors(cfg, fp8=True)
    weights = [(n, s.shape) for n, s in table.items() if s.dtype == FP8_DTYPE]
    if value == want:
        total = sum(s.nbytes for s in table.values())
        return correct(f"{want:,} bytes: {len(weights):,} FP8 weights, one fp32 scale per 128x128 block; that is "
                       f"{want / total:.3%} of the checkpoint, the price of FP8 with fine-grained scales.")
    with_mtp = sum(s.nbytes for n, s in checkpoint_tensors(cfg, fp8=True, mtp=True).items() if n.endswith(SCALE_SUFFIX))
    floor_blocks = sum((r // 128) * (c // 128) * 4 for _, (r, c) in weights)
    if value == with_mtp:
        return not_yet("that includes the MTP layer (model.layers.61), which inference ignores; count layers 0..60.")
    if value == want // 2:
        return not_yet("the scales are float32: 4 bytes each, not 2.")
    if value == want // 4:
        return not_yet("that is the number of scales; each one is a float32 of 4 bytes.")
    if value == floor_blocks:
        return not_yet("a partial edge block still needs its scale: use ceil(out/128) * ceil(in/128) blocks "
                       "(kv_a_proj_with_mqa has 576 rows -> 5 row blocks).")
    return not_yet(f"{value:,} is off by {value - want:+,} bytes. Every FP8 linear (q_a/q_b, kv_a/kv_b, o_proj, "
                   "indexer wq_b and wk, dense FFN, all routed and shared experts) has ceil(out/128) * "
                   "ceil(in/128) float32 scales; embeddings, lm_head, the router and weights_proj have none.")


# ---------------------------------------------------------------------------------------------------- 3
def solution_gpus_needed(gpu_bytes: float = H200_MEASURED, storage: str = "fp8") -> int:
    return gpus_needed(ModelConfig.deepseek_v32(), gpu_bytes, storage=storage, reserve_fraction=0.1)


def check_gpus_needed(answer, storage: str = "fp8") -> Verdict:
    """answer: the fewest H200s (`H200_MEMORY_BYTES`, 10% reserved) holding the weights in `storage` ("fp8", the
    checkpoint's format, or "bf16", dequantised), each layer whole on one GPU."""
    if answer is None:
        return not_yet("no answer yet: set `answer` to a number of GPUs.")
    try:
        n = int(answer)
    except (TypeError, ValueError):
        return not_yet(f"the answer should be a whole number of GPUs, got {answer!r}.")
    cfg = ModelConfig.deepseek_v32()
    want = solution_gpus_needed(storage=storage)
    units = module_bytes(cfg, storage)
    total = sum(units.values())
    usable = 0.9 * H200_MEASURED
    moe = units[f"model.layers.{cfg.first_k_dense_replace}"]
    other = "bf16" if storage == "fp8" else "fp8"
    if n == want:
        return correct(f"{want} GPUs. The {storage} weights ({total / 1e9:.1f} GB) would fit in "
                       f"{math.ceil(total / usable)} GPUs of {usable / 1e9:.1f} GB if they could be cut anywhere, "
                       f"but a MoE layer is a {moe / 1e9:.2f} GB block: a GPU holds only {int(usable // moe)} of them.")
    if n == math.ceil(total / usable):
        return not_yet(f"{n} GPUs hold {total / 1e9:.1f} GB only if layers could be split between GPUs. A MoE layer "
                       f"({moe / 1e9:.2f} GB) must sit whole on one GPU: how many fit in {usable / 1e9:.1f} GB?")
    if n == math.ceil(total / H200_MEASURED):
        return not_yet("keep 10% of every GPU free for the KV cache and activations (usable = 0.9 x 150.75 GB).")
    if n == gpus_needed(cfg, H200_MEASURED, storage=other):
        return not_yet(f"that is for {other} weights; this question asks about {storage} "
                       f"({'1 byte per quantised weight + scales' if storage == 'fp8' else '2 bytes per weight'}).")
    if n < want:
        return not_yet(f"{n} GPUs offer {n * usable / 1e9:.0f} GB, too little for whole layers of "
                       f"{total / 1e9:.0f} GB.")
    return not_yet(f"{n} GPUs would work, but fewer do too. Place consecutive layers greedily, each GPU up to "
                   f"{usable / 1e9:.1f} GB, and count the GPUs used.")
