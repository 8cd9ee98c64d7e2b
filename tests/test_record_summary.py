"""Chapter 6: compact summaries of selections and routing, recordings, their views, and the GPU script's logic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dslib import viz
from dslib.checkpoint import load_pretrained
from dslib.config import ModelConfig
from dslib.moe import groups_touched
from dslib.record import Recorder, SummaryRecorder, distance_bin_edges, load_recording, save_recording
from dslib.synthetic import SyntheticFP8Source

ROOT = Path(__file__).resolve().parents[1]


class Both:
    """Feeds one forward pass to two recorders."""

    def __init__(self, *recs):
        self.recs = recs

    def on_selection(self, **kw):
        for r in self.recs:
            r.on_selection(**kw)

    def on_routing(self, **kw):
        for r in self.recs:
            r.on_routing(**kw)


@pytest.fixture(scope="module")
def run():
    cfg = ModelConfig.small(index_topk=16, num_hidden_layers=3)
    model = load_pretrained(SyntheticFP8Source(cfg, seed=1), progress=False)
    T = 150
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    summary = SummaryRecorder(cfg, prompt_len=T, strip_queries=[T - 1, 60], sample_queries=range(16, T, 8), stride=3,
                              offsets=(1, 4), ep_gpus=cfg.n_group).watch(model)
    full = Recorder()
    with torch.no_grad():
        model(ids, recorder=Both(summary, full))
    return cfg, model, summary, full, T


def test_summaries_equal_what_the_full_recorder_implies(run):
    cfg, model, summary, full, T = run
    d = summary.to_dict()
    k = cfg.index_topk
    sel = d["selection"]
    for j, layer in enumerate(sel["layers"]):
        assert sorted(sel["strips"][j][1]) == full.selected_keys(layer, T - 1)
        assert sorted(sel["strips"][j][0]) == full.selected_keys(layer, 60)
        m = full.selection_matrix(layer)  # [T, S] bool: only this small test builds it
        q, s = m.nonzero(as_tuple=True)
        dist = q - s
        edges = distance_bin_edges(cfg.max_position_embeddings)
        want = np.histogram(dist.numpy(), bins=edges + [10**9])[0]
        assert sel["distance_hist"][j] == want.tolist()
        assert sel["beyond_window"][j] == int(((dist >= k) & (q >= k)).sum())
        assert sel["eligible"][j] == int((q >= k).sum())
        # neighbour overlap, offset 1, every 3rd query from 0: the share of query p's keys query p + 1 also has
        shares = [float((m[p] & m[p + 1]).sum() / m[p].sum()) for p in range(0, T - 1, 3) if p >= k]
        assert abs(sel["neighbour_mean"][j][0] - np.mean(shares)) < 1e-6
    routing = d["routing"]
    layers, load = full.expert_load_matrix()
    assert routing["layers"] == layers and routing["load"] == load.tolist()
    # groups = GPUs here (ep_gpus = n_group): the GPUs each token reaches, as chapter 4 counts nodes
    for j, layer in enumerate(layers):
        idx = torch.cat(full.routing[layer])
        touched = groups_touched(idx, cfg.n_group, cfg.n_routed_experts)
        assert routing["ep_gpus_hist"][j] == torch.bincount(touched, minlength=cfg.n_group + 1).tolist()
        assert max(touched) <= cfg.topk_group  # the group limit
    assert max(np.nonzero(routing["ep_gpus_hist_unlimited"][0])[0]) >= max(np.nonzero(routing["ep_gpus_hist"][0])[0])
    assert sum(routing["load_unlimited"][0]) == T * cfg.num_experts_per_tok


def test_unlimited_routing_uses_the_gate_bias(run):
    cfg, model, summary, full, T = run
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(40, cfg.hidden_size)
    routing = gate.route(x)
    nolimit = gate.route(x, topk_group=cfg.n_group)  # the gate itself, without the group limit
    s = SummaryRecorder(cfg, ep_gpus=cfg.n_group)
    s.note_gate(1, gate)
    s.on_routing(layer_idx=1, routing=routing)
    want = torch.bincount(nolimit.topk_idx.reshape(-1), minlength=cfg.n_routed_experts)
    assert s.to_dict()["routing"]["load_unlimited"][0] == want.tolist()


def test_summary_size_does_not_grow_with_the_sequence():
    cfg = ModelConfig.small(index_topk=8, num_hidden_layers=2)
    sizes = []
    for T in (64, 256):
        s = SummaryRecorder(cfg, prompt_len=T, strip_queries=[T - 1], sample_queries=[T // 2])
        sel = torch.randint(0, 8, (1, T, 8))
        s.on_selection(layer_idx=0, selected=sel, positions=torch.arange(T))
        sizes.append(sum(t.numel() for t in s.sel[0].values()))
    assert sizes[0] == sizes[1]


def test_recording_round_trip_and_views(run, tmp_path):
    cfg, model, summary, full, T = run
    rec = summary.to_dict(machine="cpu", weights="synthetic weights, seed 1")
    path = save_recording(rec, tmp_path / "r.json.gz")
    back = load_recording(path)
    assert back == json.loads(json.dumps(rec))
    sel, rt = back["selection"], back["routing"]
    figs = [
        viz.distance_histogram_figure(sel["distance_bin_edges"],
                                      {f"layer {n}": h for n, h in zip(sel["layers"], sel["distance_hist"])},
                                      window=back["window"]),
        viz.selection_strip_figure(sel["strips"][0][1], T - 1, window=back["window"],
                                   tokens=[f"t{i}" for i in range(T)]),
        viz.layer_overlap_figure(sel["layers"], sel["layer_overlap"]),
        viz.neighbour_overlap_figure(sel["layers"], sel["neighbour_mean"], sel["neighbour_offsets"]),
        viz.beyond_window_figure(sel["layers"], sel["beyond_window"], sel["eligible"], back["window"]),
        viz.expert_load_grid_figure(rt["load"], rt["layers"], rt["n_group"]),
        viz.load_imbalance_figure(rt["layers"], {"group-limited": rt["load"], "no limit": rt["load_unlimited"]}),
        viz.ep_traffic_figure(rt["layers"], {"group-limited": rt["ep_sent"], "no limit": rt["ep_sent_unlimited"]},
                              rt["tokens"], rt["ep_gpus"]),
        viz.layer_time_figure([{"layer": 0, "load_s": 1.0, "attention_s": 2.0, "indexer_s": 0.5, "ffn_s": 1.0}]),
        viz.kernel_time_figure({"a": [(1024, 1.0), (2048, 2.5)]}, roofline={"peak": [(1024, 0.5), (2048, 1.0)]}),
    ]
    assert all(len(f.data) for f in figs)
    # widget figures stay small (a big widget output stalls headless runs)
    big = viz.expert_load_grid_figure(np.random.default_rng(0).integers(0, 5000, (58, 256)), list(range(3, 61)), 8)
    assert len(big.to_json()) < 64_000
    strip = viz.selection_strip_figure(list(range(0, 131072, 64)), 131071, window=2048)
    assert len(strip.to_json()) < 64_000
    assert viz.distance_bin_labels([0, 1, 2, 4]) == ["0", "1", "2-3", "≥4"]


def test_the_gpu_script_imports_no_plotly():
    code = ("import sys, importlib.util; sys.modules['plotly'] = None; sys.path.insert(0, 'benchmarks'); "
            "import gpu_full_model; assert 'dslib.viz' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_the_gpu_script_runs_every_section_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_full_model

    gpu_full_model.main(["--out", str(tmp_path), "--standin", "--prompt-len", "96", "--standin-layers", "5",
                         "--decode-steps", "3"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert {k: v["status"] for k, v in results["sections"].items()} == {
        "plan": "ok", "weights": "ok", "prefill": "ok", "decode": "ok", "checkpoint": "ok"}
    rec = load_recording(tmp_path / "recording.json.gz")
    assert rec["stand_in"] and "STAND-IN" in rec["label"] and rec["complete"]
    assert len(rec["timings"]) == 5 and rec["selection"]["layers"] == [0, 1, 2, 3, 4]
    assert results["sections"]["checkpoint"]["checksums_unchanged"]
    assert (tmp_path / "full_model_layers.csv").exists() and (tmp_path / "full_model_decode.csv").exists()


def test_the_gpu_script_retries_the_prefill_with_smaller_chunks(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_full_model

    calls = []

    def fake_prefill(run, cfg, args, device, plan):
        calls.append((args.backend, args.prompt_len, args.activation_gib, plan.attn_chunk))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("pretend: the first plan's chunks did not fit")
        return None if len(calls) > 2 else ("model", "cache")

    monkeypatch.setattr(gpu_full_model, "section_prefill", fake_prefill)
    gpu_full_model.main(["--out", str(tmp_path), "--backend", "triton", "--prompt-len", "131072", "--cpu-bytes", "2e11",
                         "--skip", "weights,decode,checkpoint"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c[:3] for c in calls] == [("triton", 131072, 20.0), ("triton", 131072, 8.0)]
    assert calls[1][3] < calls[0][3]  # the second plan uses smaller chunks
    assert results["sections"]["prefill"]["status"] == "ok"
    assert results["prefill_attempts"][0]["error"].startswith("OutOfMemoryError")
