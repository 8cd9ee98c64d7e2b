"""The synthetic recall task: layout, determinism, distances."""
import pytest
import torch

from dslib.tasks import IGNORE, RecallTask, accuracy_by_distance, eval_set, make_batch


def test_layout_and_answer_is_recallable():
    task = RecallTask(seq_len=64, n_pairs=4)
    b = make_batch(task, 8, torch.Generator().manual_seed(0))
    assert b.tokens.shape == (8, 64) and (b.tokens[:, 0] == task.bos).all()
    assert b.tokens.max() < task.vocab_size
    q = b.query_mask
    assert (q.sum(1) == 4).all()
    rows, pos = q.nonzero(as_tuple=True)
    src = b.source[rows, pos]
    # the recalled value sits at `source`, right after the same key, and the key is the query token
    assert torch.equal(b.tokens[rows, src], b.targets[rows, pos])
    assert torch.equal(b.tokens[rows, src - 1], b.tokens[rows, pos])
    assert (b.distance[rows, pos] == pos - (src - 1)).all() and (b.distance[rows, pos] >= 2).all()
    # keys are distinct within a sequence; targets are values
    for r in range(8):
        keys = b.tokens[r, q[r].nonzero().squeeze(1)]
        assert len(set(keys.tolist())) == 4
    assert ((b.targets[q] >= task.value_start) & (b.targets[q] < task.vocab_size)).all()
    assert (b.targets[~q] == IGNORE).all()


def test_seeded_and_long_distances_present():
    task = RecallTask()
    a, b = eval_set(task, 64), eval_set(task, 64)
    assert torch.equal(a.tokens, b.tokens)
    d = a.distance[a.query_mask]
    assert d.max() > 128 and d.min() <= 16


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="cells"):
        RecallTask(seq_len=16, n_pairs=8)


def test_accuracy_by_distance():
    acc = accuracy_by_distance(torch.tensor([1, 0, 1, 1]), torch.tensor([3, 20, 20, 200]))
    assert acc["≤16"] == (1.0, 1) and acc["17–32"] == (0.5, 2) and acc["129–255"] == (1.0, 1)
