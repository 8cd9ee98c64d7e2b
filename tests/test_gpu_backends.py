"""On a CUDA GPU only: the whole model with backend="triton" (dslib.kernels: indexer top-k, sparse MLA, grouped FP8
MoE) gives the logits of backend="torch", from an FP8 checkpoint loaded with its weights kept FP8. Skipped without
a GPU (CPU CI checks every kernel against the PyTorch path in Triton's interpreter instead)."""
import pytest
import torch

from dslib.checkpoint import load_pretrained, save_pretrained
from dslib.config import ModelConfig
from dslib.model import DeepseekV32ForCausalLM
from dslib.record import Recorder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.xfail(strict=False, reason=(
    "2026-12-02, one H200: attention kernels match (same selections, rel 1e-2), the bf16 grouped MoE matches "
    "(rel 3e-3), but the grouped FP8 MoE at ~190 rows per expert does not (rel 0.98); Triton's interpreter agrees "
    "with torch there. Next GPU session: find which side is wrong (the prefill tiles were never checked on a GPU)."))
def test_whole_model_triton_matches_torch(tmp_path):
    cfg = ModelConfig.small(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256, kv_lora_rank=256,
                            qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, index_n_heads=16,
                            index_head_dim=128, index_topk=64, vocab_size=1024)
    torch.manual_seed(0)
    model = DeepseekV32ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    save_pretrained(model, tmp_path / "ckpt", fp8=True, progress=False)
    m = load_pretrained(tmp_path / "ckpt", device="cuda", dtype=torch.bfloat16, keep_fp8=True, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 320), generator=torch.Generator().manual_seed(1)).cuda()
    recs = {b: Recorder() for b in ("torch", "triton")}
    with torch.no_grad():
        logits = {b: m(ids, backend=b, recorder=recs[b]) for b in recs}
    ref, out = logits["torch"], logits["triton"]
    rel = float((out - ref).norm() / ref.norm())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    common = []
    for layer in recs["torch"].selection_layers:
        for q in (100, 200, 319):
            a, b = (set(recs[k].selected_keys(layer, q)) for k in ("torch", "triton"))
            common.append(len(a & b) / len(a))
    print(f"triton vs torch: logits rel {rel:.2e}, argmax agreement {agree:.3f}, "
          f"selected keys in common {min(common):.3f}..{max(common):.3f}")
    assert torch.isfinite(out).all()
    assert rel < 3e-2 and agree > 0.95 and min(common) > 0.9
