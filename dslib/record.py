"""A recorder of what the model decided during a forward pass: token selections and expert routing (chapter 5).

Pass one to `DeepseekV32ForCausalLM.forward(..., recorder=rec)` (or `generate`). Every DSA layer reports the key
indices its indexer selected for each query, every MoE layer the experts its gate chose for each token. The
notebook's views (which tokens a query attends to, how load spreads over experts) read these numbers; nothing is
re-computed by hand. Tensors are copied to the CPU as they arrive, so recording costs host memory, not GPU memory:
for T queries, k selections and L layers that is L·T·k int64 values (turn parts off with `selections=False` /
`routing=False`).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from dslib.moe import Routing, expert_load
from dslib.sparse import selection_mask


class Recorder:
    """Per-layer statistics of one or more forward passes (batch element `batch` of each call).

    selections[layer]  list of (q_positions [T] int64, selected [T, k] int64, -1 = none), one entry per call
    routing[layer]     list of topk_idx [N, num_experts_per_tok] int64 (N tokens of the call, batch-major)
    """

    def __init__(self, *, selections: bool = True, routing: bool = True, batch: int = 0):
        self.keep_selections, self.keep_routing, self.batch = selections, routing, batch
        self.selections: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self.routing: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.n_experts: int | None = None

    # ----------------------------------------------------------------------------- what the layers call
    def on_selection(self, *, layer_idx: int, selected: torch.Tensor, positions: torch.Tensor) -> None:
        """DSAttention's report: selected `[B, T, k]` key indices for the queries at `positions` `[T]`/`[B, T]`."""
        if not self.keep_selections:
            return
        pos = positions if positions.dim() == 1 else positions[self.batch]
        self.selections[layer_idx].append((pos.detach().cpu(), selected[self.batch].detach().cpu()))

    def on_routing(self, *, layer_idx: int, routing: Routing) -> None:
        """MoE's report for layer `layer_idx`: the gate's `Routing` (its `topk_idx [N, k]` is kept)."""
        self.n_experts = routing.scores.shape[-1]
        if self.keep_routing:
            self.routing[layer_idx].append(routing.topk_idx.detach().cpu())

    # ----------------------------------------------------------------------------- views
    @property
    def selection_layers(self) -> list[int]:
        return sorted(self.selections)

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.routing)

    def query_positions(self, layer: int) -> list[int]:
        """Every query position recorded for `layer`, in order."""
        return [int(p) for pos, _ in self.selections[layer] for p in pos]

    def selected_keys(self, layer: int, position: int) -> list[int]:
        """The key positions the query at `position` attended to in `layer` (last record wins), ascending."""
        found = None
        for pos, sel in self.selections[layer]:
            hit = (pos == position).nonzero()
            if len(hit):
                found = sel[int(hit[-1])]
        if found is None:
            raise KeyError(f"no query at position {position} was recorded for layer {layer}; "
                           f"recorded positions: {self.query_positions(layer)[:5]}...")
        return sorted(int(s) for s in found if s >= 0)

    def selection_matrix(self, layer: int) -> torch.Tensor:
        """bool `[Q, S]`: row q = the q-th recorded query position (ascending), True at its selected keys."""
        rows = {}
        for pos, sel in self.selections[layer]:
            rows.update(zip(pos.tolist(), sel))  # a later record of the same position wins
        if not rows:
            raise KeyError(f"no selection recorded for layer {layer} (dense attention records none).")
        positions = sorted(rows)
        return selection_mask(torch.stack([rows[p] for p in positions])[None], max(positions) + 1)[0]

    def expert_load(self, layer: int) -> torch.Tensor:
        """Tokens routed to each expert of `layer`, summed over the recorded calls: `[n_routed_experts]` int64."""
        if layer not in self.routing:
            raise KeyError(f"no routing recorded for layer {layer}; MoE layers recorded: {self.moe_layers}.")
        idx = torch.cat([r.reshape(-1) for r in self.routing[layer]])
        return expert_load(idx, self.n_experts or int(idx.max()) + 1)

    def expert_load_matrix(self) -> tuple[list[int], torch.Tensor]:
        """(MoE layer indices, load `[n_layers, n_routed_experts]` int64) for a per-layer heatmap."""
        layers = self.moe_layers
        if not layers:
            return [], torch.zeros(0, self.n_experts or 0, dtype=torch.long)
        return layers, torch.stack([self.expert_load(layer) for layer in layers])
