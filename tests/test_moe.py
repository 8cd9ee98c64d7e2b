"""Chapter 4: gate, experts, MoE block and balancing — against transformers' deepseek_v3 and simple references."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from oracle import need_transformers

from dslib.attention import FeedForward
from dslib.config import ConfigError, ModelConfig
from dslib.moe import (
    Gate,
    MoE,
    Routing,
    dispatch,
    expert_load,
    expert_weights,
    group_scores,
    groups_touched,
    max_violation,
    moe_reference,
    router_scores,
    select_experts,
    sequence_aux_loss,
    update_bias,
)


def cfg_(**kw) -> ModelConfig:
    base = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1)
    base.update(kw)
    return ModelConfig.tiny(**base)


def randomise(moe_or_gate, seed=0):
    """Random weights and a random non-zero bias (REFERENCE.md §6.4: exercise 'bias for selection only')."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe_or_gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        gate = moe_or_gate.gate if isinstance(moe_or_gate, MoE) else moe_or_gate
        gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.1)
    return moe_or_gate


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size, intermediate_size=64,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group,
        topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
        n_shared_experts=cfg.n_shared_experts,
        norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
    )


def to_hf_state_dict(sd: dict, n_experts: int) -> dict:
    """dslib's per-expert names -> transformers' fused experts (gate_up_proj [E, 2I, d] = [gate; up],
    down_proj [E, d, I])."""
    out = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    out["experts.gate_up_proj"] = torch.stack(
        [torch.cat([sd[f"experts.{e}.gate_proj.weight"], sd[f"experts.{e}.up_proj.weight"]]) for e in range(n_experts)]
    )
    out["experts.down_proj"] = torch.stack([sd[f"experts.{e}.down_proj.weight"] for e in range(n_experts)])
    return out


def sorted_routing(idx, weight):
    order = idx.argsort(dim=-1)
    return idx.gather(-1, order), weight.gather(-1, order)


# ---------------------------------------------------------------------------------------------------- names
def test_state_dict_names_are_the_checkpoints():
    cfg = cfg_(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)
    keys = set(MoE(cfg).state_dict())
    expected = {"gate.weight", "gate.e_score_correction_bias"}
    expected |= {f"experts.{e}.{p}.weight" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"shared_experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert keys == expected
    moe = MoE(cfg)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())  # moved by update_bias, not by SGD
    assert moe.shared_experts.up_proj.weight.shape == (16, 32)
    assert MoE(cfg.replace(n_shared_experts=2)).shared_experts.up_proj.weight.shape == (32, 32)
    assert MoE(cfg.replace(n_shared_experts=0)).shared_experts is None


# ---------------------------------------------------------------------------------------------------- oracle
def test_mlp_equals_transformers():
    need_transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    cfg = cfg_()
    ours = FeedForward(32, 16)
    theirs = DeepseekV3MLP(hf_config(cfg), intermediate_size=16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("groups", [(4, 2), (4, 1), (8, 3), (1, 1)])
def test_gate_equals_transformers_router(groups):
    need_transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    n_group, topk_group = groups
    cfg = cfg_(n_group=n_group, topk_group=topk_group, num_experts_per_tok=2 if topk_group == 1 else 4)
    ours = randomise(Gate(cfg))
    theirs = DeepseekV3TopkRouter(hf_config(cfg))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(64, 32)
    idx, w = sorted_routing(*ours(x))
    _, their_w, their_idx = theirs(x)
    their_idx, their_w = sorted_routing(their_idx, their_w)
    assert torch.equal(idx, their_idx)
    torch.testing.assert_close(w, their_w, rtol=1e-6, atol=1e-7)


def test_moe_block_equals_transformers():
    need_transformers()
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = cfg_()
    ours = randomise(MoE(cfg))
    theirs = DeepseekV3MoE(hf_config(cfg))
    missing = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg.n_routed_experts), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # and the routing decisions themselves
    idx, w = sorted_routing(*ours.gate(x))
    _, their_w, their_idx = theirs.gate(x)
    assert torch.equal(idx, sorted_routing(their_idx, their_w)[0])


# ---------------------------------------------------------------------------------------------------- gate maths
def test_one_group_equals_plain_topk_of_biased_scores():
    cfg = cfg_(n_group=1, topk_group=1)
    gate = randomise(Gate(cfg))
    x = torch.randn(50, 32)
    idx, w = gate(x)
    s = torch.sigmoid(x @ gate.weight.T)
    plain = (s + gate.e_score_correction_bias).topk(4, dim=-1).indices
    assert torch.equal(idx, plain)
    chosen = s.gather(1, plain)
    torch.testing.assert_close(w, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_all_groups_kept_equals_plain_topk():
    """topk_group = n_group: the group step keeps everything, so routing equals one group."""
    gate = randomise(Gate(cfg_(n_group=4, topk_group=4)))
    one = Gate(cfg_(n_group=1, topk_group=1))
    one.load_state_dict(gate.state_dict())
    x = torch.randn(40, 32)
    assert torch.equal(gate(x)[0], one(x)[0])


def test_bias_changes_selection_but_weights_use_unbiased_scores():
    gate = randomise(Gate(cfg_()))
    x = torch.randn(200, 32)
    before = gate.route(x)
    with torch.no_grad():
        gate.e_score_correction_bias[:4] += 10.0  # experts 0..3 (group 0) now always win
    after = gate.route(x)
    assert not torch.equal(before.topk_idx, after.topk_idx)
    assert (after.topk_idx.sort(-1).values == torch.arange(4)).all()
    torch.testing.assert_close(after.scores, before.scores)  # scores are unbiased
    expected = after.scores.gather(1, after.topk_idx)
    torch.testing.assert_close(after.topk_weight, 2.5 * expected / expected.sum(-1, keepdim=True))
    torch.testing.assert_close(after.topk_weight.sum(-1), torch.full((200,), 2.5))


def test_group_limit_is_respected_and_group_score_is_top2_sum():
    cfg = cfg_(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    gate = randomise(Gate(cfg))
    x = torch.randn(100, 32)
    r = gate.route(x)
    assert (groups_touched(r.topk_idx, 8, 32) <= 3).all()
    biased = r.scores + gate.e_score_correction_bias
    top2 = [biased[:, 4 * g : 4 * g + 4].sort(-1, descending=True).values[:, :2].sum(-1) for g in range(8)]
    manual = torch.stack(top2, -1)
    torch.testing.assert_close(group_scores(biased, 8), manual)
    chosen_groups = r.topk_idx // 4
    assert r.group_kept.gather(1, chosen_groups).all()
    # without the limit the same scores reach more groups
    free = gate.route(x, topk_group=8)
    assert groups_touched(free.topk_idx, 8, 32).float().mean() > groups_touched(r.topk_idx, 8, 32).float().mean()


def test_step_functions_compose_to_the_gate():
    cfg = cfg_(n_group=1, topk_group=1)
    gate = randomise(Gate(cfg))
    x = torch.randn(10, 32)
    s = router_scores(x, gate.weight)
    idx = select_experts(s + gate.e_score_correction_bias, 4)
    r = gate.route(x)
    assert torch.equal(r.topk_idx, idx)
    torch.testing.assert_close(r.topk_weight, expert_weights(s, idx, 2.5))


def test_gate_rejects_bad_input_shape():
    gate = Gate(cfg_())
    with pytest.raises(ValueError, match="hidden_size=32"):
        gate.route(torch.randn(4, 31))
    with pytest.raises(ValueError, match=r"\[B, T, d\]"):
        MoE(cfg_())(torch.randn(4, 32))


# ---------------------------------------------------------------------------------------------------- config checks
def test_configs_the_router_cannot_run_are_rejected():
    with pytest.raises(ConfigError, match="not divisible by n_group"):
        cfg_(n_routed_experts=10, n_group=4)
    with pytest.raises(ConfigError, match="too few"):
        cfg_(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=5)  # 1 group x 4 experts < 5
    with pytest.raises(ConfigError, match="2 best"):
        Gate(cfg_(n_routed_experts=8, n_group=8, topk_group=4, num_experts_per_tok=2))
    # limit cases that are fine
    Gate(cfg_(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=4))
    Gate(cfg_(n_group=1, topk_group=1))


# ---------------------------------------------------------------------------------------------------- dispatch
def test_batched_dispatch_equals_per_token_loop():
    moe = randomise(MoE(cfg_()))
    x = torch.randn(3, 6, 32)
    torch.testing.assert_close(moe(x), moe_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_dispatch_handles_idle_experts_and_gradients():
    cfg = cfg_()
    moe = randomise(MoE(cfg))
    x = torch.randn(5, 32)
    idx = torch.tensor([[0, 1, 2, 3]] * 5)  # experts 4..15 get nothing
    w = torch.rand(5, 4, requires_grad=True)
    y = dispatch(x, idx, w, moe.experts)
    manual = sum(w[:, j: j + 1] * moe.experts[j](x) for j in range(4))
    torch.testing.assert_close(y, manual)
    y.sum().backward()
    assert w.grad is not None and moe.experts[0].up_proj.weight.grad is not None
    assert moe.experts[5].up_proj.weight.grad is None


def test_recorder_receives_routing():
    moe = randomise(MoE(cfg_(), layer_idx=7))
    seen = []
    moe(torch.randn(2, 3, 32), recorder=SimpleNamespace(on_routing=lambda **kw: seen.append(kw)))
    assert len(seen) == 1 and seen[0]["layer_idx"] == 7 and isinstance(seen[0]["routing"], Routing)
    seen = [seen[0]["routing"]]
    assert seen[0].topk_idx.shape == (6, 4) and seen[0].scores.shape == (6, 16)


# ---------------------------------------------------------------------------------------------------- balancing
def test_load_statistics():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    load = expert_load(idx, 4)
    assert load.tolist() == [3, 3, 1, 1]
    assert max_violation(load) == pytest.approx(3 / 2 - 1)
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0
    assert groups_touched(idx, 2, 4).tolist() == [1, 2, 1, 2]  # groups {0,1} and {2,3}


def test_bias_update_moves_toward_balance_without_gradient():
    gate = Gate(cfg_(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1))
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    update_bias(gate, load, gamma=0.1)
    torch.testing.assert_close(gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    update_bias(gate, torch.tensor([5, 5, 5, 5]), gamma=0.1)  # balanced: no move
    torch.testing.assert_close(gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert gate.e_score_correction_bias.grad is None


def test_bias_update_balances_a_skewed_router():
    torch.manual_seed(1)
    cfg = cfg_(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(); gate.weight[0] += 1.0  # noqa: E702
    x = torch.randn(512, 32) + 0.5
    start = max_violation(expert_load(gate(x)[0], 8))
    for _ in range(300):
        update_bias(gate, expert_load(gate(x)[0], 8), gamma=0.01)
    assert max_violation(expert_load(gate(x)[0], 8)) < 0.3 < start


def test_sequence_aux_loss_matches_the_formula():
    torch.manual_seed(2)
    B, T, E, k, alpha = 3, 5, 6, 2, 0.01
    scores = torch.rand(B, T, E)
    idx = scores.topk(k, -1).indices
    total = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (k * T) * sum(int(i in idx[b, t].tolist()) for t in range(T))
            p = sum(float(scores[b, t, i] / scores[b, t].sum()) for t in range(T)) / T
            total += f * p
    assert float(sequence_aux_loss(scores, idx, alpha)) == pytest.approx(alpha * total / B, rel=1e-5)
    # perfectly balanced routing with uniform scores gives alpha exactly (sum_i 1 * 1/E * E)
    flat = torch.full((1, 6, 6), 0.5)
    even = torch.arange(6).view(1, 6, 1)
    assert float(sequence_aux_loss(flat, even, alpha)) == pytest.approx(alpha)
    # batch-wise variant = the whole batch as one sequence
    batch = sequence_aux_loss(scores.reshape(1, B * T, E), idx.reshape(1, B * T, k), alpha)
    assert batch.shape == ()
    with pytest.raises(ValueError, match=r"\[B, T, E\]"):
        sequence_aux_loss(scores[0], idx[0], alpha)


def test_aux_loss_gradient_pushes_overloaded_experts_down():
    scores = torch.full((1, 4, 4), 0.5, requires_grad=True)
    idx = torch.tensor([[[0], [0], [0], [1]]])  # expert 0 overloaded
    sequence_aux_loss(scores, idx, 1.0).backward()
    g = scores.grad[0, 0]
    assert g[0] > g[1] > g[2] and g[2] == pytest.approx(float(g[3]))
