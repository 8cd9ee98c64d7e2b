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


# ---------------------------------------------------------------------------------------------------------------
# Compact summaries for full-size runs (chapter 6)
# ---------------------------------------------------------------------------------------------------------------
RECORDING_FORMAT = "dslib-recording-1"


def distance_bin_edges(max_distance: int) -> list[int]:
    """Lower edges of the log-scale distance bins: [0, 1, 2, 4, 8, ...]: bin 0 holds distance 0, bin j >= 1 holds
    distances 2^(j-1) .. 2^j - 1 (the last bin ends above `max_distance`)."""
    edges, e = [0, 1], 1
    while e * 2 <= max(max_distance, 1):
        e *= 2
        edges.append(e)
    return edges


class SummaryRecorder:
    """What the model decided, kept as compact summaries that fit 128K tokens x 61 layers (never a [T, S] matrix).

    Same hooks as `Recorder` (`on_selection`, `on_routing`). Accumulators live on the device of
    the tensors they are given (no host sync per call); `to_dict()` copies them out. Per DSA layer:
      distance_hist   counts of selected keys by query-key distance, log-scale bins (`distance_bin_edges`)
      beyond_window   selected keys at distance >= `window` (index_topk by default: a sliding window of the same
                      budget would never see them), and all selected keys of queries at positions >= window
      strips          the selected key positions (in score order) of each `strip_queries` position
      samples         the same for `sample_queries` (for the overlap of selections between layers)
      neighbours      for offsets D in `offsets`: mean share of query p's selection that query p + D also selects,
                      over every `stride`-th query (with p >= window, where selections are really sparse)
    Per MoE layer (N routed tokens, E experts, k per token):
      load            tokens per expert [E], with the gate's group limit and, computed from the same scores with
                      the same bias, without it (`load_unlimited`)
      ep_*            an expert-parallel placement of E / ep_gpus consecutive experts per GPU, each token's home GPU
                      round-robin (token n of a layer on GPU n mod ep_gpus, as data-parallel attention spreads
                      tokens): how many GPUs each token must reach (histogram 0..ep_gpus), copies sent to other
                      GPUs, and copies each GPU receives — with and without the group limit.
    The bias per MoE layer comes from `watch(model)` or `note_gate(layer_idx, gate)`; without it the no-limit
    routing is computed with zero bias (noted in the output).
    """

    def __init__(self, cfg, *, prompt_len: int | None = None, strip_queries=(), sample_queries=(),
                 window: int | None = None, offsets=(1, 16, 256), stride: int = 64, ep_gpus: int = 8, batch: int = 0):
        self.cfg = cfg
        self.batch = batch
        self.window = int(window or cfg.index_topk)
        self.edges = distance_bin_edges(cfg.max_position_embeddings)
        self.strip_queries = sorted({int(q) for q in strip_queries})
        self.sample_queries = sorted({int(q) for q in sample_queries})
        self.offsets, self.stride = tuple(int(o) for o in offsets), int(stride)
        self.prompt_len = prompt_len
        E = cfg.n_routed_experts
        if ep_gpus <= 0 or E % ep_gpus:
            raise ValueError(f"ep_gpus={ep_gpus} must divide n_routed_experts={E} (consecutive experts per GPU).")
        self.ep_gpus = ep_gpus
        self.sel: dict[int, dict[str, torch.Tensor]] = {}
        self.moe: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens_seen: dict[int, int] = defaultdict(int)
        self.gate_bias: dict[int, torch.Tensor] = {}
        self.meta: dict = {}

    # ------------------------------------------------------------------------------------------- setup
    def watch(self, model) -> "SummaryRecorder":
        """Read the router bias of every MoE layer of a model (or an iterable of decoder layers)."""
        layers = getattr(getattr(model, "model", None), "layers", model)
        for layer in layers:
            if hasattr(layer.mlp, "gate"):  # a MoE layer
                self.note_gate(layer.mlp.layer_idx, layer.mlp.gate)
        return self

    def note_gate(self, layer_idx: int, gate) -> None:
        self.gate_bias[layer_idx] = gate.e_score_correction_bias.detach().float()

    def reset(self) -> None:
        self.sel.clear()
        self.moe.clear()
        self.tokens_seen.clear()

    # ------------------------------------------------------------------------------------------- selections
    def _sel_state(self, layer: int, device) -> dict[str, torch.Tensor]:
        if layer not in self.sel:
            k = self.cfg.index_topk
            z = lambda shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
            self.sel[layer] = {
                "distance_hist": z(len(self.edges)), "beyond": z(()), "eligible": z(()),
                "strips": torch.full((len(self.strip_queries), k), -2, dtype=torch.long, device=device),
                "samples": torch.full((len(self.sample_queries), k), -2, dtype=torch.long, device=device),
                "nb_sum": torch.zeros(len(self.offsets), dtype=torch.float64, device=device),
                "nb_count": z(len(self.offsets)),
                "nb_hist": z((len(self.offsets), 10)),
            }
        return self.sel[layer]

    def on_selection(self, *, layer_idx: int, selected: torch.Tensor, positions: torch.Tensor) -> None:
        """selected `[B, T, k]` key indices (-1 = none) for the queries at `positions` (`[T]` or `[B, T]`)."""
        sel = selected[self.batch]
        pos = (positions if positions.dim() == 1 else positions[self.batch]).to(sel.device)
        st = self._sel_state(layer_idx, sel.device)
        valid = sel >= 0
        dist = pos[:, None] - sel  # [T, k]; meaningless where invalid
        edges = torch.tensor(self.edges[1:], device=sel.device)
        bins = torch.bucketize(dist.clamp(min=0), edges, right=True)  # 0 -> bin 0, 1 -> 1, 2..3 -> 2, ...
        st["distance_hist"] += torch.bincount(bins[valid], minlength=len(self.edges))[: len(self.edges)]
        full = (pos >= self.window)[:, None] & valid
        st["eligible"] += full.sum()
        st["beyond"] += (full & (dist >= self.window)).sum()
        for name, queries in (("strips", self.strip_queries), ("samples", self.sample_queries)):
            if queries:
                q = torch.tensor(queries, device=sel.device)
                hit = pos[:, None] == q[None, :]  # [T, nq]
                found = hit.any(0)
                rows = sel[hit.float().argmax(0)]  # [nq, k]
                st[name] = torch.where(found[:, None], rows, st[name])
        T = sel.shape[0]
        for j, off in enumerate(self.offsets):
            if T <= off:
                continue
            r = torch.arange(0, T - off, self.stride, device=sel.device)
            a, b = sel[r], sel[r + off]
            keep = pos[r] >= self.window
            share = _overlap_share(a, b)  # [n] fraction of a's keys also in b
            st["nb_sum"][j] += share[keep].double().sum()
            st["nb_count"][j] += keep.sum()
            st["nb_hist"][j] += torch.bincount((share[keep] * 10).clamp(max=9.999).long(), minlength=10)[:10]

    # ------------------------------------------------------------------------------------------- routing
    def on_routing(self, *, layer_idx: int, routing) -> None:
        """The gate's `Routing` for the N tokens of one call of MoE layer `layer_idx`."""
        idx = routing.topk_idx
        device = idx.device
        E, G, k = self.cfg.n_routed_experts, self.ep_gpus, idx.shape[-1]
        if layer_idx not in self.moe:
            z = lambda shape: torch.zeros(shape, dtype=torch.long, device=device)  # noqa: E731
            self.moe[layer_idx] = {f"{w}{s}": z(shape) for s in ("", "_unlimited") for w, shape in
                                   (("load", (E,)), ("ep_gpus_hist", (G + 1,)), ("ep_sent", ()), ("ep_received", (G,)))}
        st = self.moe[layer_idx]
        bias = self.gate_bias.get(layer_idx)
        choice = routing.scores.float() + (bias.to(device) if bias is not None else 0.0)
        unlimited = choice.topk(k, dim=-1).indices
        N = idx.shape[0]
        home = (torch.arange(N, device=device) + self.tokens_seen[layer_idx]) % G
        self.tokens_seen[layer_idx] += N
        for suffix, chosen in (("", idx), ("_unlimited", unlimited)):
            st["load" + suffix] += torch.bincount(chosen.reshape(-1), minlength=E)
            reach = torch.zeros(N, G, dtype=torch.bool, device=device).scatter_(1, chosen // (E // G), True)
            st["ep_gpus_hist" + suffix] += torch.bincount(reach.sum(1), minlength=G + 1)
            remote = reach.clone()
            remote[torch.arange(N, device=device), home] = False
            st["ep_sent" + suffix] += remote.sum()
            st["ep_received" + suffix] += remote.sum(0)
        if bias is None:
            self.meta["unlimited_bias"] = "zero (no gate bias was noted)"

    # ------------------------------------------------------------------------------------------- output
    def layer_overlap(self) -> tuple[list[int], list[list[float]]]:
        """(layers, [L, L]) mean share of a sampled query's selected keys that two layers have in common (sample
        queries at positions >= window only)."""
        layers = sorted(self.sel)
        if not layers or not self.sample_queries:
            return layers, []
        samples = torch.stack([self.sel[layer]["samples"] for layer in layers])  # [L, ns, k], on the device
        S = max(self.sample_queries) + 2
        total = torch.zeros(len(layers), len(layers), dtype=torch.float64, device=samples.device)
        seen = ~(samples == -2).all(2).any(0)  # [ns] queries every layer recorded
        n = 0
        for j, q in enumerate(self.sample_queries):
            if q < self.window or not bool(seen[j]):
                continue  # dense there, or a layer did not see this query
            rows = samples[:, j]  # [L, k]
            # one-hot rows over the keys; 0/1 products add up exactly in fp32 (counts < 2^24)
            onehot = torch.zeros(len(layers), S, dtype=torch.float32, device=samples.device)
            onehot.scatter_(1, torch.where(rows >= 0, rows, S - 1), 1.0)
            onehot[:, S - 1] = 0
            counts = onehot.sum(1).clamp(min=1)
            total += ((onehot @ onehot.T) / counts[:, None]).double()
            n += 1
        return layers, (total / max(n, 1)).cpu().tolist() if n else []

    def to_dict(self, *, overlap: bool = True, **meta) -> dict:
        """Everything as plain lists and numbers (JSON-ready), with `meta` (machine, weights, ...) on top.
        overlap=False skips the layer-overlap matrix (the one part that costs more than a copy)."""
        layers = sorted(self.sel)
        moe_layers = sorted(self.moe)
        cpu = {layer: {k: v.cpu() for k, v in self.sel[layer].items()} for layer in layers}
        mcpu = {layer: {k: v.cpu() for k, v in self.moe[layer].items()} for layer in moe_layers}

        def rows(t):  # strips / samples: valid key positions per query, in score order ([] if never seen)
            return [[int(x) for x in r if x >= 0] for r in t]

        overlap = self.layer_overlap()[1] if overlap else []
        cfg = self.cfg
        return {
            "format": RECORDING_FORMAT, **self.meta, **meta,
            "config": cfg.to_dict(), "prompt_len": self.prompt_len, "window": self.window,
            "selection": {
                "layers": layers, "distance_bin_edges": self.edges,
                "distance_hist": [cpu[layer]["distance_hist"].tolist() for layer in layers],
                "beyond_window": [int(cpu[layer]["beyond"]) for layer in layers],
                "eligible": [int(cpu[layer]["eligible"]) for layer in layers],
                "strip_queries": self.strip_queries, "strips": [rows(cpu[layer]["strips"]) for layer in layers],
                "sample_queries": self.sample_queries, "layer_overlap": overlap,
                "neighbour_offsets": list(self.offsets), "neighbour_stride": self.stride,
                "neighbour_mean": [[float(s / c) if c else None
                                    for s, c in zip(cpu[layer]["nb_sum"], cpu[layer]["nb_count"])] for layer in layers],
                "neighbour_hist": [cpu[layer]["nb_hist"].tolist() for layer in layers],
            },
            "routing": {
                "layers": moe_layers, "n_experts": cfg.n_routed_experts, "n_group": cfg.n_group,
                "topk_group": cfg.topk_group, "experts_per_token": cfg.num_experts_per_tok, "ep_gpus": self.ep_gpus,
                "tokens": [self.tokens_seen[layer] for layer in moe_layers],
                **{key: [mcpu[layer][key].tolist() for layer in moe_layers] for key in
                   (mcpu[moe_layers[0]] if moe_layers else {})},
            },
        }


def _overlap_share(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the share of a's valid entries (>= 0) that also appear in b's row. a, b `[n, k]` int64 -> `[n]`."""
    b_sorted = b.sort(dim=1).values
    pos = torch.searchsorted(b_sorted, a).clamp(max=b.shape[1] - 1)
    hit = (b_sorted.gather(1, pos) == a) & (a >= 0)
    return hit.sum(1).float() / (a >= 0).sum(1).clamp(min=1).float()


def save_recording(recording: dict, path):
    """Write a recording (`SummaryRecorder.to_dict(...)` plus anything JSON-able) as gzip-compressed JSON."""
    import gzip
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(recording, f, separators=(",", ":"))
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_recording(path) -> dict:
    """Read a recording written by `save_recording` (checks its format tag)."""
    import gzip
    import json

    with gzip.open(path, "rt", encoding="utf-8") as f:
        rec = json.load(f)
    if rec.get("format") != RECORDING_FORMAT:
        raise ValueError(f"{path} is not a dslib recording (format {rec.get('format')!r}, expected "
                         f"{RECORDING_FORMAT!r}).")
    return rec
