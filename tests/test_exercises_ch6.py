"""Chapter 6 exercise checks: the solutions pass, typical mistakes get their specific hint, stubs run."""
from __future__ import annotations

import torch

from dslib.exercises import ch6


def test_chunked_layer():
    assert ch6.check_chunked_layer(ch6.solution_chunked_layer)

    def stub(layer, x, cache, chunk):
        raise NotImplementedError

    assert "stub" in repr(ch6.check_chunked_layer(stub))

    def fresh_cache_per_chunk(layer, x, cache, chunk):
        from dslib.sparse import DSACache
        out = x.clone()
        for s in range(0, x.shape[1], chunk):
            c = cache if s == 0 else DSACache()
            out[:, s:s + chunk] += layer.self_attn(layer.input_layernorm(out[:, s:s + chunk]), None, c)
        return out + layer.mlp(layer.post_attention_layernorm(out))

    assert "cache" in repr(ch6.check_chunked_layer(fresh_cache_per_chunk))


def test_ep_sends():
    assert ch6.check_ep_sends(ch6.solution_ep_sends)

    def per_expert(idx, E, G):
        return torch.full((idx.shape[0],), idx.shape[1])

    assert "distinct" in repr(ch6.check_ep_sends(per_expert))


def test_cache_bytes():
    assert ch6.check_cache_bytes(61 * 1408)
    assert "one layer" in repr(ch6.check_cache_bytes(1408))
    assert "indexer" in repr(ch6.check_cache_bytes(61 * 1152))
    assert "None" in repr(ch6.check_cache_bytes(None))
