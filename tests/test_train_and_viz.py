"""The training stages on a tiny task (a few steps, seconds), checkpoint round trip, plots and exercise checks."""
import plotly.graph_objects as go
import pytest
import torch

from dslib import train, viz
from dslib.config import ModelConfig
from dslib.cost import attention_flops_per_token, core_attention_flops, indexer_flops
from dslib.exercises import ch3 as ex
from dslib.sparse import time_attention
from dslib.tasks import RecallTask, eval_set, window_accuracy_bound

TASK = RecallTask(seq_len=48, n_pairs=4)


def _model():
    cfg = train.experiment_config(TASK, hidden_size=32, intermediate_size=32, q_lora_rank=16, kv_lora_rank=16,
                                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
                                  index_head_dim=16, index_topk=8, max_position_embeddings=64)
    return train.RecallModel(cfg)


def test_stages_touch_the_right_parameters():
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    train.train_stage(m, TASK, "warmup", steps=2, batch_size=4, warmup=1, progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".indexer." in n for n in changed)  # stage 1: only the indexers move
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    log = train.train_stage(m, TASK, "sparse", steps=2, batch_size=4, warmup=1, progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert any(".indexer." in n for n in changed) and any(".indexer." not in n for n in changed)
    assert log.steps == 2 and len(log.loss) == 1 and log.kl[0] >= 0
    log = train.train_stage(m, TASK, "dense", steps=2, batch_size=4, warmup=1, progress=False)
    assert all(p.requires_grad for p in m.parameters())


def test_model_forward_paths_agree(tmp_path):
    m = _model().eval()
    tokens = eval_set(TASK, 3).tokens
    with torch.no_grad():
        for attention in ("dense", "sparse", "window"):
            a = m(tokens, attention)  # absorbed: a selection gathers its latents
            stats = m.stats(need_probs=True)
            b = m(tokens, attention, mode="naive", stats=stats)  # MHA mode, a selection as a mask
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            assert (stats[0].selected is None) == (attention == "dense")
    path = train.save_model(m, tmp_path / "m.safetensors")
    m2 = train.load_model(path)
    with torch.no_grad():
        torch.testing.assert_close(m2(tokens), m(tokens))
    with pytest.raises(FileNotFoundError, match="dslib.train"):
        train.load_model(tmp_path / "missing.safetensors")


def test_evaluate_and_analysis_shapes():
    m = _model()
    ev = eval_set(TASK, 8)
    r = train.evaluate(m, ev, "sparse")
    assert 0 <= r["accuracy"] <= 1 and r["queries"] == 32 and len(r["hit_rate"]) == 2
    a = train.attention_analysis(m, ev, k=8)
    assert set(a) == {"recall_indexer", "recall_window", "mass_on_source", "hit_indexer", "hit_window"}
    assert all(0 <= v <= 1 + 1e-6 for vals in a.values() for v in vals)
    view = train.inspect_sequence(m, ev.tokens[0])
    assert view["probs"][0].shape == (48, 48)


def test_accounting():
    cfg = ModelConfig.deepseek_v32()
    L = 4096
    assert core_attention_flops(cfg, L, "dense") == L * (L + 1) // 2 * 2 * 128 * 1088
    assert core_attention_flops(cfg, 100, "sparse") == core_attention_flops(cfg, 100, "dense")  # L <= k: dense
    assert core_attention_flops(cfg, L, "sparse", skip_masked=False) == L * 2048 * 2 * 128 * 1088
    assert indexer_flops(cfg, L) == L * (L + 1) // 2 * (2 * 64 * 128 + 2 * 64)
    d, s = attention_flops_per_token(cfg, 100_000, "dense"), attention_flops_per_token(cfg, 100_000, "sparse")
    assert d["indexer"] == 0 and s["core"] == 2048 * 2 * 128 * 1088 and s["total"] < d["total"] / 5
    t = time_attention([64, 128], heads=2, latent=8, rope=4, k=8, index_heads=2, index_dim=8, repeats=1)
    assert set(t) == {"dense", "sparse", "indexer"} and all(len(v) == 2 for v in t.values())
    assert window_accuracy_bound(torch.tensor([1, 5, 50, 100]), 10, 4) == pytest.approx(0.5 + 0.5 / 4)


def test_figures():
    for name in viz.sparse.__all__:
        assert callable(getattr(viz, name))
    figs = [
        viz.selection_matrix_figure(torch.eye(4, dtype=torch.bool)),
        viz.selection_row_figure(torch.softmax(torch.randn(10), 0), query=7, indexer=[1, 3, -1], window=[7, 6],
                                 source=3),
        viz.indexer_terms_figure(torch.rand(2, 5), torch.tensor([0.5, -0.2]), torch.rand(5)),
        viz.accuracy_by_distance_figure({"dense": {"≤16": 1.0}, "window": {"≤16": 0.5}}, chance=1 / 64),
        viz.recall_by_layer_figure({k: [0.5, 0.2] for k in ("recall_indexer", "recall_window", "mass_on_source",
                                                           "hit_indexer", "hit_window")}),
        viz.training_curves_figure({"dense": {"every": 10, "acc": [0.1, 0.5], "kl": [0, 0], "steps": 20}}),
        viz.cost_vs_length_figure([1, 2], {"dense (measured)": [1, 4]}, y="s", title="t"),
        viz.paper_cost_figure({"V3.1-Terminus": ([0, 1024], [1, 2])}, {"V3.2 (DSA)": ([0, 1024], [1, 1.5])},
                              phase="decode"),
    ]
    assert all(isinstance(f, go.Figure) and f.data for f in figs)


def test_exercise_checks():
    assert ex.check_index_score(ex.solution_index_score)
    v = ex.check_index_score(lambda q, w, k: float((w * (q @ k)).sum()))
    assert not v and "ReLU" in v.message
    def stub(*a):
        raise NotImplementedError
    assert "stub" in ex.check_index_score(stub).message
    assert ex.check_attention_recall(ex.solution_attention_recall)
    v = ex.check_attention_recall(lambda p, s: float(p[s].sum()))
    assert not v and "-1" in v.message
    p = ex.solution_crossover()
    cfg = ModelConfig.deepseek_v32()

    def flops(pos, a):
        return attention_flops_per_token(cfg, pos, a)["total"]

    assert flops(p, "sparse") < flops(p, "dense") and flops(p - 1, "sparse") >= flops(p - 1, "dense")
    assert 2048 < p < 2200
    assert ex.check_crossover(p)
    assert "half cost" in ex.check_crossover(ex.solution_crossover(False)).message
    assert "indexer" in ex.check_crossover(2048).message
    assert not ex.check_crossover(None)


def test_rows_give_the_same_numbers_as_full():
    m = _model().eval()
    b = eval_set(TASK, 3)
    rows = train.query_rows(b)
    with torch.no_grad():
        full = m.stats(need_probs=True, need_index_scores=True)
        part = m.stats(need_probs=True, need_index_scores=True, rows=rows)
        m(b.tokens, "dense", stats=full)
        m(b.tokens, "dense", stats=part)
    for f, p in zip(full, part):
        idx = rows.unsqueeze(-1).expand(-1, -1, f.index_scores.shape[-1])
        torch.testing.assert_close(p.index_scores, f.index_scores.gather(1, idx), rtol=1e-5, atol=1e-6)
        at_rows = rows.view(3, -1, 1, 1).expand(-1, -1, *f.probs.shape[2:])
        torch.testing.assert_close(p.probs, f.probs.gather(1, at_rows))
