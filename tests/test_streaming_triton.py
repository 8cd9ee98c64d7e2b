"""Chapter 6: the streamed model with backend="triton" (the kernels of dslib.kernels) in Triton's CPU interpreter."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels are decorated at import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from dslib.kernels import triton_problem  # noqa: E402  (reads the version only; imports no Triton)

if triton_problem() is not None:  # e.g. torch 2.4, which ships Triton 3.0
    pytest.skip(f"the kernels do not run here: {triton_problem()}", allow_module_level=True)

from dslib.config import ModelConfig  # noqa: E402
from dslib.devices import plan_run  # noqa: E402
from dslib.record import SummaryRecorder  # noqa: E402
from dslib.streaming import StreamedModel  # noqa: E402
from dslib.synthetic import SyntheticFP8Source  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("TRITON_INTERPRET was set to something else before this file loaded", allow_module_level=True)


def test_streamed_triton_backend_matches_torch_within_fp8_error():
    cfg = ModelConfig.small(index_topk=8, num_hidden_layers=2)  # layer 0 dense, layer 1 MoE; widths multiples of 128
    src = SyntheticFP8Source(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    out, recs = {}, {}
    for backend in ("torch", "triton"):
        plan = plan_run(cfg, [8e6], prompt_len=24, names=["cpu"], dtype_bytes=4, reserve_bytes=0, streaming=True,
                        backend=backend, attn_chunk=16)
        model = StreamedModel(src, plan, dtype=torch.float32)
        recs[backend] = SummaryRecorder(cfg, prompt_len=24, ep_gpus=cfg.n_group)
        out[backend] = model.prefill(ids, recorder=recs[backend])
        assert all(t.indexer_s is not None for t in model.timings)
    scale = out["torch"].abs().max()
    assert (out["torch"] - out["triton"]).abs().max() < 0.1 * scale  # the MoE kernel quantises activations to e4m3
    a, b = recs["torch"].to_dict(), recs["triton"].to_dict()
    assert a["selection"]["distance_hist"] == b["selection"]["distance_hist"]  # same selections (fp32 indexer)
