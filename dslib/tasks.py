"""Synthetic long-range task: multi-query associative recall (MQAR) (chapter 3).

A sequence defines key→value pairs early on ("k v") and asks for them later ("k ?"): at the query position the
model must output the value that followed the same key, which may be hundreds of tokens back. Only a model
that can look at the right far-away token solves it, so it separates a content-based selection (the lightning
indexer) from a position-based one (a sliding window) at the same budget of k tokens.

Layout of one sequence of length L (token ids in disjoint ranges, see `RecallTask`):

    position 0            BOS
    positions 1..L-1      two-token cells (1,2), (3,4), ...; a random subset holds the pairs and the queries:
                          definition cell  = [key, value]      (the value is what must be recalled)
                          query cell       = [key, value]      (same key, later; the model must predict the value
                                                                at the key's position, the value is the next input)
                          every other position holds a random filler token

The loss and the accuracy count only the query positions (where the next token is the recalled value); chance
is 1 / n_values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # target value of positions that carry no loss (torch's cross_entropy default ignore_index)

# Distance buckets (query position - key position) used to report accuracy vs distance.
DISTANCE_BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 128), (129, 255), (256, 511), (512, 1023))


@dataclass(frozen=True)
class RecallTask:
    """Sizes of the task. Token ids: 0 = BOS, then `n_filler` fillers, `n_keys` keys, `n_values` values."""

    seq_len: int = 256
    n_pairs: int = 16
    n_filler: int = 32
    n_keys: int = 64
    n_values: int = 64

    def __post_init__(self) -> None:
        cells = (self.seq_len - 1) // 2
        if self.n_pairs <= 0 or self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs={self.n_pairs} must lie in 1..n_keys={self.n_keys} (keys are distinct).")
        if 2 * self.n_pairs > cells:
            raise ValueError(
                f"seq_len={self.seq_len} has {cells} two-token cells, fewer than the 2*n_pairs={2 * self.n_pairs} "
                "needed for definitions and queries. Raise seq_len or lower n_pairs."
            )

    # token id ranges
    @property
    def bos(self) -> int:
        return 0

    @property
    def filler_start(self) -> int:
        return 1

    @property
    def key_start(self) -> int:
        return 1 + self.n_filler

    @property
    def value_start(self) -> int:
        return 1 + self.n_filler + self.n_keys

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_filler + self.n_keys + self.n_values

    def replace(self, **changes) -> "RecallTask":
        return RecallTask(**{**self.__dict__, **changes})


@dataclass
class RecallBatch:
    """A batch of MQAR sequences. All tensors are [B, L].

    tokens:    input token ids (int64)
    targets:   the value to predict at each query position, `IGNORE` elsewhere
    distance:  query position - key position at query positions, 0 elsewhere
    source:    position of the value token to recall (definition position + 1) at query positions, -1 elsewhere
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    distance: torch.Tensor
    source: torch.Tensor

    @property
    def query_mask(self) -> torch.Tensor:
        return self.targets != IGNORE

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def slice(self, start: int, stop: int) -> "RecallBatch":
        return RecallBatch(*(t[start:stop] for t in (self.tokens, self.targets, self.distance, self.source)))


def make_batch(task: RecallTask, batch_size: int, generator: torch.Generator | None = None) -> RecallBatch:
    """Sample `batch_size` fresh sequences. Deterministic for a seeded `generator`.

    For each sequence: choose 2·n_pairs of the two-token cells, pair them up at random (a random matching),
    the earlier cell of each pair defines the key, the later one queries it. Keys are distinct within a
    sequence, values are drawn with replacement.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    g = generator
    B, L, P = batch_size, task.seq_len, task.n_pairs
    cells = (L - 1) // 2
    tokens = torch.randint(task.filler_start, task.key_start, (B, L), generator=g)  # fillers everywhere
    tokens[:, 0] = task.bos
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    distance = torch.zeros((B, L), dtype=torch.long)
    source = torch.full((B, L), -1, dtype=torch.long)

    # 2P distinct cells per row, randomly matched: (cell[2i], cell[2i+1]) is pair i
    chosen = torch.rand((B, cells), generator=g).argsort(dim=1)[:, : 2 * P]  # [B, 2P]
    first, second = chosen[:, 0::2], chosen[:, 1::2]
    def_cell, query_cell = torch.minimum(first, second), torch.maximum(first, second)  # [B, P]
    def_pos, query_pos = 1 + 2 * def_cell, 1 + 2 * query_cell  # position of the key token
    keys = task.key_start + torch.rand((B, task.n_keys), generator=g).argsort(dim=1)[:, :P]  # distinct
    values = task.value_start + torch.randint(0, task.n_values, (B, P), generator=g)

    rows = torch.arange(B).unsqueeze(1).expand(B, P)
    tokens[rows, def_pos] = keys
    tokens[rows, def_pos + 1] = values
    tokens[rows, query_pos] = keys
    tokens[rows, query_pos + 1] = values  # the answer is also the next input (teacher forcing)
    targets[rows, query_pos] = values
    distance[rows, query_pos] = query_pos - def_pos
    source[rows, query_pos] = def_pos + 1
    return RecallBatch(tokens, targets, distance, source)


def eval_set(task: RecallTask, n: int = 512, seed: int = 1234) -> RecallBatch:
    """A fixed evaluation set (seeded, independent of the training stream)."""
    return make_batch(task, n, torch.Generator().manual_seed(seed))


def bucket_of(distance: torch.Tensor, buckets=DISTANCE_BUCKETS) -> torch.Tensor:
    """Index of each distance's bucket (-1 if it falls in none)."""
    out = torch.full_like(distance, -1)
    for i, (lo, hi) in enumerate(buckets):
        out[(distance >= lo) & (distance <= hi)] = i
    return out


def bucket_label(bucket: tuple[int, int]) -> str:
    lo, hi = bucket
    return f"≤{hi}" if lo <= 1 else f"{lo}–{hi}"


def accuracy_by_distance(correct: torch.Tensor, distance: torch.Tensor,
                         buckets=DISTANCE_BUCKETS) -> dict[str, tuple[float, int]]:
    """{bucket label: (accuracy, count)} over the query positions; `correct` and `distance` are 1-D over queries.
    Buckets without queries are left out."""
    which = bucket_of(distance, buckets)
    out = {}
    for i, b in enumerate(buckets):
        sel = which == i
        n = int(sel.sum())
        if n:
            out[bucket_label(b)] = (float(correct[sel].float().mean()), n)
    return out


def window_reach(distance: torch.Tensor, window: int) -> torch.Tensor:
    """bool per query: is the token to recall (the value, at distance - 1 before the query) inside a sliding
    window of `window` keys (positions p - window + 1 .. p)? True iff distance <= window."""
    return distance <= window


def window_accuracy_bound(distance: torch.Tensor, window: int, n_values: int) -> float:
    """Best accuracy a model restricted to a window can reach: perfect on reachable queries, chance (1/n_values)
    on the others."""
    reach = window_reach(distance, window).float().mean().item()
    return reach + (1 - reach) / n_values
