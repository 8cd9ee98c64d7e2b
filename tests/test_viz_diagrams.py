"""The chapter diagrams: pure functions that draw shapes and labels, with every size computed from their input."""
from __future__ import annotations

import plotly.graph_objects as go
import torch

from dslib import viz
from dslib.config import ModelConfig
from dslib.moe import Gate


def texts(fig: go.Figure) -> str:
    return "\n".join(a.text or "" for a in fig.layout.annotations)


def test_kv_cache_step_diagram():
    fig = viz.kv_cache_step_diagram(cached=4, kv_heads=2, heads=8, head_dim=16, dtype_bytes=4)
    assert isinstance(fig, go.Figure) and len(fig.layout.shapes) >= 2 * 5
    t = texts(fig)
    assert "256 B" in t and "all 5 keys" in t and "[B, 8, 1, 16]" in t  # 2 x 2 x 16 x 4 bytes, 4 cached + 1 new


def test_mla_dataflow_diagram_uses_the_config():
    big, tiny = viz.mla_dataflow_diagram(ModelConfig.deepseek_v32()), viz.mla_dataflow_diagram(ModelConfig.tiny())
    assert "= 576 values" in texts(big) and "40,960 values / token" in texts(big) and "71×" in texts(big)
    cfg = ModelConfig.tiny()
    assert f"= {cfg.kv_lora_rank + cfg.qk_rope_head_dim} values" in texts(tiny)
    assert "naive (MHA mode)" in texts(big) and "absorbed (MQA mode)" in texts(big)


def test_dsa_pipeline_diagram_uses_the_config():
    t = texts(viz.dsa_pipeline_diagram(ModelConfig.deepseek_v32()))
    assert "k = 2,048" in t and "656 B / token" in t and "132 B / token" in t and "8,192 MACs" in t
    assert "139,264 MACs" in t
    assert "k = 4" in texts(viz.dsa_pipeline_diagram(ModelConfig.tiny()))


def test_routing_groups_diagram_marks_what_the_gate_did():
    cfg = ModelConfig.small()
    gate = Gate(cfg)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(0.05 * torch.randn(cfg.n_routed_experts))
    r = gate.route(torch.randn(2, cfg.hidden_size))
    fig = viz.routing_groups_diagram(r.scores[0], gate.e_score_correction_bias, r.group_kept[0], r.topk_idx[0],
                                     r.topk_weight[0], cfg.n_group)
    t = texts(fig)
    assert t.count("(dropped)") == cfg.n_group - cfg.topk_group
    weights = [f"{w:.2f}" for w in r.topk_weight[0].tolist()]
    assert all(w in t for w in weights)
    groups = r.group_scores[0].tolist()
    assert all(f"group {g}: {v:.2f}" in t for g, v in enumerate(groups))  # the group score, as the gate computed it
    assert "dropped" not in texts(viz.routing_groups_diagram(r.scores[0], gate.e_score_correction_bias, None,
                                                             r.topk_idx[0], r.topk_weight[0], cfg.n_group))


def test_model_diagram_uses_the_config():
    t = texts(viz.model_diagram(ModelConfig.deepseek_v32()))
    assert "N = 0 … 60" in t and "layers 0 … 2" in t and "256 experts" in t and "187.1M" in t
    assert "N = 0 … 2" in texts(viz.model_diagram(ModelConfig.tiny()))
