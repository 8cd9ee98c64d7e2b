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
    k, v = (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)) if groups == "ri" else (k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1))
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
