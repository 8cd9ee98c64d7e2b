"""Chapter 4: every figure function draws, and every exercise check accepts the solution and explains mistakes."""
from __future__ import annotations

import plotly.graph_objects as go
import torch

from dslib import viz
from dslib.config import ModelConfig
from dslib.exercises import ch4
from dslib.moe import Gate
from dslib.viz import moe as vm


def test_every_figure_function_returns_a_figure():
    gate = Gate(ModelConfig.tiny(hidden_size=16, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4))
    r = gate.route(torch.randn(3, 16))
    figs = [
        vm.params_bars(["671B"], [671.9], [38.4]),
        vm.token_routing(r.scores[0], gate.e_score_correction_bias, r.group_kept[0], r.topk_idx[0],
                         r.topk_weight[0], 4),
        vm.token_routing(r.scores[0], gate.e_score_correction_bias, None, r.topk_idx[0], r.topk_weight[0], 1),
        vm.maxvio_curves([0, 10], {"none": [1.0, 0.5]}, colors=vm.SETTING_COLORS),
        vm.expert_load_heatmap(torch.rand(2, 16), ["L0", "L1"], 4),
        vm.task_expert_heatmap(torch.rand(8, 16), list("abcdefgh")),
        vm.quality_bars(["t1", "t2"], {"none": [0.5, 1.0]}),
        vm.nodes_touched_bars({"limit": [0, 1, 5, 0], "free": [0, 1, 3, 2]}),
        vm.bias_curves([0, 1, 2], torch.rand(3, 16), n_group=4),
    ]
    assert all(isinstance(f, go.Figure) and f.data for f in figs)
    assert set(vm.__all__) <= set(dir(viz))
    # dropped groups are faded in the token view
    fig = figs[1]
    opacity = fig.data[0].marker.opacity
    kept = r.group_kept[0].repeat_interleave(4)
    assert [o == 1.0 for o in opacity] == kept.tolist()


def test_group_scores_exercise():
    assert ch4.check_group_scores(ch4.solution_group_scores)
    v = ch4.check_group_scores(lambda s, g: s.view(s.shape[0], g, -1).max(-1).values)
    assert not v and "best TWO" in v.message
    v = ch4.check_group_scores(lambda s, g: s.view(s.shape[0], g, -1).sum(-1))
    assert not v and "every expert" in v.message
    v = ch4.check_group_scores(lambda s, g: s.view(s.shape[0], -1, g).transpose(1, 2).topk(2, -1).values.sum(-1))
    assert not v and "CONTIGUOUS" in v.message

    def stub(s, g):
        raise NotImplementedError

    assert "stub" in ch4.check_group_scores(stub).message
    assert "shape" in ch4.check_group_scores(lambda s, g: s).message


def test_bias_update_exercise():
    assert ch4.check_bias_update(ch4.solution_bias_update)
    v = ch4.check_bias_update(lambda b, load, g: b - g * torch.sign(load.float().mean() - load.float()))
    assert not v and "reversed" in v.message
    v = ch4.check_bias_update(lambda b, load, g: b + g * (load.float().mean() - load.float()))
    assert not v and "sign" in v.message
    v = ch4.check_bias_update(lambda b, load, g: g * torch.sign(load.float().mean() - load.float()))
    assert not v and "only the change" in v.message


def test_active_params_exercise():
    want = ch4.solution_active_params()
    cfg = ModelConfig.deepseek_v32()
    assert ch4.check_active_params(want) and ch4.check_active_params(want * 1.001)
    assert want - cfg.active_params() == 8 * cfg.param_counts()["expert"] * 58
    assert "placeholder" in ch4.check_active_params(...).message
    assert "billions" in ch4.check_active_params(want / 1e9).message
    assert "8 experts per token" in ch4.check_active_params(cfg.active_params()).message
    assert "stored" in ch4.check_active_params(cfg.total_params()).message
    assert "once" in ch4.check_active_params(cfg.active_params() + 8 * cfg.param_counts()["expert"]).message
    assert "dense" in ch4.check_active_params(cfg.active_params() + 8 * cfg.param_counts()["expert"] * 61).message
    assert not ch4.check_active_params("lots")
