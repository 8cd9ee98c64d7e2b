"""Selections and the gather-based sparse attention on given tensors (no model needed)."""
import pytest
import torch

from dslib.sparse import (
    attention_recall,
    causal_mask,
    dense_masked_attention,
    selection_mask,
    sparse_attention,
    topk_selection,
    window_selection,
)


def _scores(B, T, S, offset=0):
    s = torch.randn(B, T, S)
    pos = offset + torch.arange(T)
    return s.masked_fill(~causal_mask(pos, S), float("-inf")), pos


def test_topk_is_causal_and_short_rows_are_dense():
    scores, pos = _scores(2, 10, 10)
    sel = topk_selection(scores, 4, pos)
    assert sel.shape == (2, 10, 4)
    assert ((sel <= pos.view(1, -1, 1)) | (sel == -1)).all()
    for t in range(4):  # rows with <= k visible keys keep exactly all of them
        for b in range(2):
            kept = sorted(x for x in sel[b, t].tolist() if x >= 0)
            assert kept == list(range(t + 1))
    assert (sel[:, 4:] >= 0).all()
    # top-k agrees with a sort
    ref = scores[0, 9].argsort(descending=True)[:4]
    assert torch.equal(sel[0, 9], ref)


def test_topk_pads_when_fewer_keys_than_budget_and_rejects_bad_k():
    scores, pos = _scores(1, 3, 3)
    sel = topk_selection(scores, 8, pos)
    assert sel.shape == (1, 3, 8) and (sel[..., 3:] == -1).all()
    with pytest.raises(ValueError, match="positive"):
        topk_selection(scores, 0)


def test_window_selection():
    sel = window_selection(torch.arange(6), 3)
    assert sel.shape == (1, 6, 3)
    assert sel[0, 0].tolist() == [0, -1, -1] and sel[0, 5].tolist() == [5, 4, 3]


def test_selection_mask_roundtrip():
    sel = torch.tensor([[[0, 2, -1], [1, -1, -1]]])
    m = selection_mask(sel, 4)
    assert m.tolist() == [[[True, False, True, False], [False, True, False, False]]]


@pytest.mark.parametrize("selector", ["topk", "window"])
def test_sparse_gather_equals_dense_masked(selector):
    B, T, H, C, R, k = 2, 37, 3, 8, 4, 5
    qa, qr = torch.randn(B, T, H, C), torch.randn(B, T, H, R)
    lat, kr = torch.randn(B, T, C), torch.randn(B, T, R)
    pos = torch.arange(T)
    if selector == "topk":
        scores, _ = _scores(B, T, T)
        sel = topk_selection(scores, k, pos)
    else:
        sel = window_selection(pos, k).expand(B, -1, -1)
    allowed = selection_mask(sel, T) & causal_mask(pos, T)
    ref = dense_masked_attention(qa, qr, lat, kr, allowed, 0.3)
    out = sparse_attention(qa, qr, lat, kr, sel, 0.3, chunk=8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sparse_with_all_keys_equals_dense_causal():
    B, T, H, C, R = 1, 12, 2, 6, 4
    qa, qr = torch.randn(B, T, H, C), torch.randn(B, T, H, R)
    lat, kr = torch.randn(B, T, C), torch.randn(B, T, R)
    pos = torch.arange(T)
    scores, _ = _scores(B, T, T)
    sel = topk_selection(scores, T, pos)
    ref = dense_masked_attention(qa, qr, lat, kr, causal_mask(pos, T), 0.5)
    torch.testing.assert_close(sparse_attention(qa, qr, lat, kr, sel, 0.5), ref, rtol=1e-5, atol=1e-6)


def test_attention_recall():
    p = torch.tensor([[[0.5, 0.3, 0.2]]])
    assert attention_recall(p, torch.tensor([[[0, 2]]])).item() == pytest.approx(0.7)
    assert attention_recall(p, torch.tensor([[[0, 1, 2]]])).item() == pytest.approx(1.0)


def test_topk_breaks_ties_by_key_position_whatever_the_row_length():
    """Many index scores are exactly 0 (ReLU): the selection must not depend on how many future keys a row has,
    or a cached decode (one row, S keys) would select differently from the full forward (T rows, T keys)."""
    scores = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]]])  # one query at position 5, ties at 0
    picked = topk_selection(scores, 4, torch.tensor([5]))
    assert picked.tolist() == [[[1, 4, 0, 2]]]  # best first, then the earliest of the tied keys
    padded = torch.cat([scores, torch.full((1, 1, 10), float("-inf"))], dim=-1)  # same row inside a longer call
    assert topk_selection(padded, 4, torch.tensor([5])).tolist() == picked.tolist()
