"""Chapter 5's figures and exercise checks: solutions pass, typical mistakes get a helpful 'not yet'."""
from __future__ import annotations

import math

import plotly.graph_objects as go
import torch

from dslib.checkpoint import bytes_by_component, checkpoint_tensors
from dslib.config import ModelConfig
from dslib.devices import plan_devices
from dslib.exercises import ch5
from dslib.viz import model as vm


def test_figures_draw_what_they_get():
    cfg = ModelConfig.deepseek_v32()
    parts = {"FP8": {k: v / 1e9 for k, v in bytes_by_component(checkpoint_tensors(cfg, fp8=True)).items()}}
    assert isinstance(vm.checkpoint_bytes_figure(parts), go.Figure)
    rows = plan_devices(cfg, [150.75e9] * 8).rows()
    fig = vm.device_plan_figure(rows)
    assert len(fig.data[1].y) == 8
    mat = torch.zeros(4, 6, dtype=torch.bool)
    mat[torch.arange(4), torch.arange(4)] = True
    fig = vm.selection_figure(mat, [0, 1, 2, 5], query=5)
    assert "position 5: 1 of 6" in fig.layout.title.text
    attn = [dict(phase="decode", variant=v, context=c, batch=1, median_ms=m)
            for v, m in (("sparse", 1.0), ("dense_absorbed", 2.0)) for c in (1024, 4096)]
    attn.append(dict(phase="decode", variant="dense_naive", context=8192, batch=1, median_ms=None))
    assert len(vm.gpu_attention_figure(attn, "decode", batch=1).data) == 2
    ffn = [dict(block=b, tokens=n, median_ms=1.0) for b in ("moe", "dense_mlp") for n in (1, 8)]
    assert len(vm.gpu_ffn_figure(ffn).data) == 2
    lm = [dict(largest_shard_bytes=1e8, extra_bytes=2e7)]
    assert len(vm.load_memory_figure(lm).data) == 2
    assert set(vm.__all__) <= set(dir(vm))


def test_dequantize_exercise():
    assert ch5.check_dequantize(ch5.solution_dequantize)

    def stub(q, s):
        raise NotImplementedError

    assert "stub" in repr(ch5.check_dequantize(stub))

    def divides(q, s):
        full = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
        return q.float() / full

    assert "MULTIPLIED" in repr(ch5.check_dequantize(divides))

    def no_crop(q, s):
        return q.float()[:, :] * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]] \
            if q.shape[0] % 128 == 0 else torch.zeros(s.shape[0] * 128, q.shape[1])

    assert "crop" in repr(ch5.check_dequantize(no_crop))


def test_scale_bytes_exercise():
    want = ch5.solution_scale_bytes()
    # by hand, 671B dims: ceil(out/128) * ceil(in/128) fp32 scales per FP8 linear (kv_a_proj_with_mqa: 576 rows -> 5)
    def scales(out, inp):
        return math.ceil(out / 128) * math.ceil(inp / 128) * 4

    d, q, c = 7168, 1536, 512
    attention = scales(q, d) + scales(128 * 192, q) + scales(c + 64, d) + scales(128 * 256, c) + scales(d, 128 * 128)
    indexer = scales(64 * 128, q) + scales(128, d)
    expert = 2 * scales(2048, d) + scales(d, 2048)
    dense_ffn = 2 * scales(18432, d) + scales(d, 18432)
    assert want == 61 * (attention + indexer) + 3 * dense_ffn + 58 * 257 * expert == 163_553_984
    assert ch5.check_scale_bytes(want)
    assert "4 bytes" in repr(ch5.check_scale_bytes(want // 2))
    assert "MTP" in repr(ch5.check_scale_bytes(sum(
        s.nbytes for n, s in checkpoint_tensors(ModelConfig.deepseek_v32(), fp8=True, mtp=True).items()
        if n.endswith("_scale_inv"))))
    assert "not yet" in repr(ch5.check_scale_bytes(None))


def test_gpus_needed_exercise():
    want = ch5.solution_gpus_needed()
    assert want == 6 and ch5.check_gpus_needed(want)
    naive = math.ceil(674.03e9 / (0.9 * ch5.H200_MEASURED))
    assert naive < want and "whole on one GPU" in repr(ch5.check_gpus_needed(naive))
    assert "not yet" in repr(ch5.check_gpus_needed(None))
    assert "fewer do too" in repr(ch5.check_gpus_needed(want + 2))
