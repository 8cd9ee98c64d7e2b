"""The "build it" exercises: the learner writes the central piece of each chapter. For each check: a correct
solution written from torch operations passes, the notebook's stub gets a helpful "not yet", typical mistakes are
named, and calling dslib's own version is refused."""
from __future__ import annotations

import torch

from dslib.exercises import ch1


def stub(*args):
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------- chapter 1
def _step(q, k_new, v_new, k_cache, v_cache, *, append=True, attend_first=False, causal="position", groups="ri",
          scale=True):
    """A learner's cached attention step, from torch operations, with switchable mistakes."""
    S, T, hd = k_cache.shape[2], q.shape[2], q.shape[-1]
    k_all, v_all = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    k, v = (k_cache, v_cache) if attend_first else (k_all, v_all)
    G = q.shape[1] // k.shape[1]
    if groups == "ri":
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    else:
        k, v = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)
    scores = q @ k.transpose(-1, -2) * (hd**-0.5 if scale else 1.0)
    if causal and not attend_first:
        first = S if causal == "position" else 0
        scores = scores.masked_fill(torch.arange(k.shape[2]) > (first + torch.arange(T))[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return (out, k_all, v_all) if append else (out, k_cache, v_cache)


def test_cached_attention_solution_and_stub():
    assert ch1.check_cached_attention(_step)
    assert ch1.check_cached_attention(ch1.solution_cached_attention)
    v = ch1.check_cached_attention(stub)
    assert not v and "stub" in v.message and "torch.cat" in v.message


def test_cached_attention_names_the_mistake():
    cases = {
        "still holds": dict(append=False),
        "do not see themselves": dict(attend_first=True),
        "must not see the new tokens after it": dict(causal=None),
        "sits at position S + t": dict(causal="index"),
        "repeat_interleave": dict(groups="repeat"),
        "1 / sqrt(head_dim)": dict(scale=False),
    }
    for words, mistake in cases.items():
        v = ch1.check_cached_attention(lambda *a, m=mistake: _step(*a, **m))
        assert not v and words in v.message, (mistake, v.message)


def test_cached_attention_refuses_dslib_itself():
    from dslib.attention import causal_attention

    def borrowed(q, k_new, v_new, k_cache, v_cache):
        k, v = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
        S = k_cache.shape[2]
        return causal_attention(q, k, v, torch.arange(S, S + q.shape[2])), k, v

    v = ch1.check_cached_attention(borrowed)
    assert not v and "causal_attention" in v.message and "torch operations" in v.message


def test_a_correct_check_shows_dslibs_version():
    html = ch1.check_cached_attention(_step)._repr_html_()
    assert "version, to compare" in html and 'data-source="causal_attention"' in html
    assert "version, to compare" not in ch1.check_cached_attention(stub)._repr_html_()


# ---------------------------------------------------------------------------------------------- chapter 2
from dslib.exercises import ch2  # noqa: E402


def test_absorbed_attention_solution_and_stub():
    assert ch2.check_absorbed_attention(ch2.solution_absorbed_attention)
    v = ch2.check_absorbed_attention(stub)
    assert not v and "stub" in v.message and "mla.w_uk()" in v.message


def test_absorbed_attention_names_the_mistake():
    cases = {
        "softmax_scale": dict(scale=False),
        "position part": dict(rope=False),
        "later keys": dict(mask=None),
        "q_positions[t]": dict(mask="index"),
        "finish with mla.o_proj": dict(out="heads"),
        "lift it with W_UV": dict(out="latent"),
    }
    for words, mistake in cases.items():
        v = ch2.check_absorbed_attention(lambda *a, m=mistake: ch2._absorbed(*a, **m))
        assert not v and words in v.message, (mistake, v.message)


def test_absorbed_attention_refuses_the_naive_path_and_dslib_itself():
    def naive(mla, q_nope, q_rope, kv_latent, k_rope, pos):  # builds per-head K/V with kv_b_proj
        B, T, H, _ = q_nope.shape
        kv = mla.kv_b_proj(kv_latent).view(B, -1, H, mla.nope_dim + mla.v_head_dim)
        k_nope, v = kv.split([mla.nope_dim, mla.v_head_dim], -1)
        s = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope))
        s = (s * mla.softmax_scale).masked_fill(torch.arange(kv_latent.shape[1]) > pos[:, None], float("-inf"))
        return mla.o_proj(torch.einsum("bhts,bshv->bthv", s.softmax(-1), v).reshape(B, T, -1))

    v = ch2.check_absorbed_attention(naive)
    assert not v and "kv_b_proj" in v.message
    v = ch2.check_absorbed_attention(
        lambda mla, qn, qr, c, kr, pos: mla.o_proj(mla.attend(qn, qr, c, kr, pos).flatten(2)))
    assert not v and "MLA.attend" in v.message


def test_heads_at_ridge():
    want = ch2.solution_heads_at_ridge()
    assert want == 110 and ch2.check_heads_at_ridge(want)
    assert "MORE FLOPs" in ch2.check_heads_at_ridge(want - 1).message
    assert "ridge itself" in ch2.check_heads_at_ridge(206).message
    assert "multiply-adds" in ch2.check_heads_at_ridge(2 * want).message
    assert "None" in ch2.check_heads_at_ridge(None).message


# ---------------------------------------------------------------------------------------------- chapter 3
from dslib.exercises import ch3  # noqa: E402


def _select(scores, k, pos, lat, rope, *, mask_future=True, pad=True, largest=True, batch=True, gather_rope=True):
    """A learner's top-k selection and gather, from torch operations, with switchable mistakes."""
    B, T, S = scores.shape
    kk = min(k, S) if pad else k
    top, sel = scores.topk(kk, dim=-1, largest=largest) if largest else \
        torch.where(torch.isinf(scores), scores, -scores).topk(kk, dim=-1)
    if mask_future:
        sel = sel.masked_fill((top == float("-inf")) | (sel > pos.view(1, -1, 1)), -1)
    if kk < k:
        sel = torch.cat([sel, sel.new_full((B, T, k - kk), -1)], -1)
    idx = sel.clamp(min=0)
    if batch:
        b = torch.arange(B).view(B, 1, 1)
        return sel, lat[b, idx], (rope[b, idx] if gather_rope else rope[b, idx.flip(-1)])
    return sel, lat[0][idx], rope[0][idx]


def test_select_and_gather_solution_and_stub():
    assert ch3.check_select_and_gather(ch3.solution_select_and_gather)
    assert ch3.check_select_and_gather(_select)
    v = ch3.check_select_and_gather(stub)
    assert not v and "stub" in v.message and "topk" in v.message


def test_select_and_gather_names_the_mistake():
    cases = {
        "after its own position": dict(mask_future=False),
        "pad the remaining slots with -1": dict(pad=False),
        "LOWEST": dict(largest=False),
        "its own kv_latent[b]": dict(batch=False),
        "rope keys are not": dict(gather_rope=False),
    }
    for words, mistake in cases.items():
        v = ch3.check_select_and_gather(lambda *a, m=mistake: _select(*a, **m))
        assert not v and words in v.message, (mistake, v.message)


def test_select_and_gather_refuses_dslib_itself():
    from dslib.sparse import topk_selection

    def borrowed(s, k, p, lat, rope):
        sel = topk_selection(s, k, p)
        b, idx = torch.arange(s.shape[0]).view(-1, 1, 1), sel.clamp(min=0)
        return sel, lat[b, idx], rope[b, idx]

    v = ch3.check_select_and_gather(borrowed)
    assert not v and "topk_selection" in v.message


# ---------------------------------------------------------------------------------------------- chapter 4
from dslib.exercises import ch4  # noqa: E402


def test_route_solution_and_stub():
    assert ch4.check_route(ch4.solution_route)
    v = ch4.check_route(stub)
    assert not v and "stub" in v.message and "sigmoid" in v.message


def test_route_names_the_mistake():
    cases = {
        "softmax": dict(score="softmax"),
        "weights include the bias": dict(weights_with_bias=True),
        "chosen by the plain scores": dict(choose_with_bias=False),
        "TWO best": dict(group_score="max"),
        "CONTIGUOUS": dict(groups="strided"),
        "more than topk_group": dict(limit=False),
        "not renormalised": dict(normalise=False),
        "routed_scaling_factor": dict(scale=False),
    }
    for words, mistake in cases.items():
        v = ch4.check_route(lambda *a, m=mistake: ch4._route(*a, **m))
        assert not v and words in v.message, (mistake, v.message)


def test_route_refuses_dslib_itself_and_bad_shapes():
    from dslib.moe import group_scores

    def borrowed(x, w, b, cfg):
        s = torch.sigmoid(x @ w.T)
        group_scores(s + b, cfg.n_group)  # any call into dslib.moe is refused
        return ch4._route(x, w, b, cfg)

    v = ch4.check_route(borrowed)
    assert not v and "group_scores" in v.message
    v = ch4.check_route(lambda x, w, b, cfg: ch4._route(x, w, b, cfg)[0])
    assert not v and "two tensors" in v.message


# ---------------------------------------------------------------------------------------------- chapter 5
from dslib.exercises import ch5  # noqa: E402


def _scale_grid(q, s, how="interleave"):
    rows, cols = q.shape
    if how == "tile":
        return s.repeat(128, 128)[:rows, :cols]
    if how == "first_column":
        return s[:, :1].repeat_interleave(128, 0)[:rows]
    return s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def test_dequantize_solution_stub_and_mistakes():
    assert ch5.check_dequantize(lambda q, s: q.float() * _scale_grid(q, s))
    assert ch5.check_dequantize(ch5.solution_dequantize)
    v = ch5.check_dequantize(stub)
    assert not v and "stub" in v.message and "repeat_interleave" in v.message
    assert "MULTIPLIED" in ch5.check_dequantize(lambda q, s: q.float() / _scale_grid(q, s)).message
    v = ch5.check_dequantize(lambda q, s: q.float() * _scale_grid(q, s, "tile"))
    assert "tiles the whole scale grid" in v.message
    v = ch5.check_dequantize(lambda q, s: q.float() * _scale_grid(q, s, "first_column"))
    assert not v and "every 128" in v.message


def test_dequantize_refuses_dslib_itself():
    from dslib.checkpoint import dequantize_fp8_blocks

    v = ch5.check_dequantize(lambda q, s: dequantize_fp8_blocks(q, s))
    assert not v and "dequantize_fp8_blocks" in v.message


def test_gpus_needed_in_bf16():
    want = ch5.solution_gpus_needed(storage="bf16")
    assert want == 12 and ch5.check_gpus_needed(want, storage="bf16")
    v = ch5.check_gpus_needed(ch5.solution_gpus_needed(), storage="bf16")
    assert not v and "fp8 weights" in v.message
    assert "whole on one GPU" in ch5.check_gpus_needed(10, storage="bf16").message


# ---------------------------------------------------------------------------------------------- no answer on screen
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ANSWERS = {  # what each notebook's build-it exercise asks the learner to write: never listed before the check passes
    "01_kv_cache.ipynb": ("check_cached_attention", ["causal_attention", "Attention.forward"]),
    "02_mla.ipynb": ("check_absorbed_attention", ["MLA.attend", "dense_masked_attention"]),
    "03_sparse_attention.ipynb": ("check_select_and_gather", ["topk_selection", "sparse_attention"]),
    "04_moe_routing.ipynb": ("check_route", ["Gate.route", "group_scores", "keep_top_groups", "limit_to_groups",
                                             "expert_weights", "select_experts"]),
    "05_full_model.ipynb": ("check_dequantize", ["dequantize_fp8_blocks"]),
}


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_each_notebook_has_a_build_it_exercise_whose_answer_is_not_shown(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    check, answers = ANSWERS[name]
    assert re.search(rf"\b{check}\(", code), f"{name} has no build-it exercise calling {check}"
    for answer in answers:
        shown = re.findall(rf"\bshow\((?:\w+\.)*{re.escape(answer)}\b", code)
        assert not shown, f"{name} shows {answer}, the answer to its exercise, before the learner writes it"
