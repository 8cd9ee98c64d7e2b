"""Chapter 5's text model: corpus, tokenizer, token classes, distances, the training command (tiny, CPU), the
artifact through dslib.load_pretrained, and the text views."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dslib import lm_data

SNIPPET = 'def area(r):\n    """Circle area."""\n    return 3.14 * r ** 2  # approx\n\nif True:\n\tx = area(2)\n'


@pytest.fixture(scope="module")
def small_tokenizer():
    corpus = lm_data.load_corpus(max_files=6)
    return lm_data.train_tokenizer(corpus.train.values(), vocab_size=400)


def test_corpus_split_is_deterministic_disjoint_and_complete():
    files = lm_data.corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert not any(f.startswith(("test/", "site-packages/", "idlelib/")) or "/tests/" in f for f in files)
    split = lm_data.split_files(files)
    assert set(split["train"]).isdisjoint(split["eval"])
    assert sorted(split["train"] + split["eval"]) == files
    assert 0.01 < len(split["eval"]) / len(files) < 0.12
    # the split is a property of each path alone: a subset splits the same way
    again = lm_data.split_files(files[::3])
    assert set(again["eval"]) == set(split["eval"]) & set(files[::3])
    assert lm_data.is_eval_file("json/encoder.py") == lm_data.is_eval_file("json/encoder.py")


def test_tokenizer_round_trip_and_unseen_characters(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert tok.token_to_id(lm_data.EOT) == 0
    for text in (SNIPPET, "naïve café 🙂 中文 \x00 tab\there", ""):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text  # byte-level BPE: any UTF-8 text, no unknown token
        assert max(ids, default=0) < tok.get_vocab_size()
    tok.save(str(tmp_path / "tokenizer.json"))
    again = lm_data.load_tokenizer(tmp_path)
    assert again.encode(SNIPPET).ids == tok.encode(SNIPPET).ids
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        lm_data.load_tokenizer(tmp_path / "missing")


def test_token_pieces_cover_the_text(small_tokenizer):
    text = "s = 'é🙂'\n"
    enc = small_tokenizer.encode(text)
    pieces = lm_data.token_pieces(text, enc.offsets)
    assert len(pieces) == len(enc.ids) and "".join(pieces) == text


def test_token_classes_on_a_snippet(small_tokenizer):
    ids, classes = lm_data.encode_with_classes(small_tokenizer, SNIPPET)
    enc = small_tokenizer.encode(SNIPPET)
    assert len(classes) == len(ids)

    def classes_of(word, nth=0):  # the classes of the tokens that overlap the nth occurrence of `word`
        start = -1
        for _ in range(nth + 1):
            start = SNIPPET.index(word, start + 1)
        end = start + len(word)
        return {lm_data.TOKEN_CLASSES[c] for (a, b), c in zip(enc.offsets, classes) if a < end and b > start
                and SNIPPET[max(a, start):min(b, end)].strip()}

    assert classes_of("def") == classes_of("return") == classes_of("True") == {"keyword"}
    assert classes_of("area") == classes_of("x", 1) == {"identifier"}  # (the 1st x is in "approx")
    assert classes_of('"""Circle area."""') == {"string"}
    assert classes_of("# approx") == {"comment"}
    assert classes_of("3.14") == classes_of("2", 0) == {"number"}
    assert classes_of("**") == classes_of("(") == {"operator"}
    pieces = lm_data.token_pieces(SNIPPET, enc.offsets)
    outside = [lm_data.TOKEN_CLASSES[c] for p, c, (a, _) in zip(pieces, classes, enc.offsets)
               if p and not p.strip() and not 11 < a < 29]  # whitespace tokens outside the docstring
    assert set(outside) == {"whitespace"}
    # broken code: classes up to the error, no exception
    broken = lm_data.token_classes("x = (\n", small_tokenizer.encode("x = (\n").offsets)
    assert len(broken) == len(small_tokenizer.encode("x = (\n").ids)


def test_distance_to_previous_and_buckets():
    ids = torch.tensor([[5, 6, 5, 7, 6, 6]])
    assert lm_data.distance_to_previous(ids).tolist() == [[0, 0, 2, 0, 3, 1]]
    window = 64
    names = lm_data.bucket_names(window)
    assert names == ["1-8", "9-64", "65-256", ">256", "first occurrence"]
    d = torch.tensor([0, 1, 8, 9, 64, 65, 256, 257, 1000])
    assert lm_data.distance_bucket(d, window).tolist() == [4, 0, 0, 1, 1, 2, 2, 3, 3]


def test_batches_and_eval_sequences():
    stream = lm_data.TokenStream(torch.arange(100))
    g = torch.Generator().manual_seed(0)
    b = lm_data.random_batch(stream, 3, 10, g)
    assert b.shape == (3, 11) and bool(((b[:, 1:] - b[:, :-1]) == 1).all())
    seqs, classes = lm_data.eval_sequences(stream, 10, 4)
    assert seqs.shape == (4, 11) and classes is None and seqs[1, 0] == 10 and seqs[0, -1] == 10
    with pytest.raises(ValueError, match="fewer than one sequence"):
        lm_data.random_batch(lm_data.TokenStream(torch.arange(5)), 1, 10, g)


# ---------------------------------------------------------------------------------------------------- views
def test_text_grid_layout():
    from dslib.viz import text_grid

    grid = text_grid(["ab", "\n", "\tc", "d" * 20], width=10)
    assert grid.token[0, :3].tolist() == [0, 0, 1]  # "ab" then the newline's cell
    assert grid.token[1, :5].tolist() == [2, 2, 2, 2, 2]  # a tab to column 4, then "c"
    assert grid.chars[1, 4] == "c" and grid.shape == (4, 10)  # the d's wrap twice


def test_text_views_return_figures():
    from dslib import viz

    pieces = ["def", " f", "(", "x", "):", "\n   ", " return", " x"]
    fig = viz.text_selection_figure(pieces, 6, [0, 1, 3, 6], window=2, layer=1)
    z = np.asarray(fig.data[0].z, dtype=float)
    tok = viz.text_grid(pieces).token
    cell = {int(t): z[r, c] for (r, c), t in np.ndenumerate(tok) if t >= 0}
    assert cell[6] == 1 and cell[0] == 2 and cell[5] == 3 and cell[7] == 5 and cell[2] == 0
    assert "beyond the 2-token window" in fig.layout.title.text
    fig = viz.text_expert_figure(pieces, [0, 1, 2, 3, 0, 1, 2, 3], 8, layer=2, n_group=4)
    assert "expert 3 (group 1)" in fig.data[0].colorbar.ticktext
    fig = viz.text_class_figure(pieces, [0, 1, 5, 1, 5, 2, 0, 1], lm_data.TOKEN_CLASSES)
    assert len(fig.data) == 1
    with pytest.raises(ValueError, match="one value per token"):
        viz.token_text_figure(pieces, [0], ["a"], ["#fff"])
    with pytest.raises(ValueError, match="outside"):
        viz.text_selection_figure(pieces, 99, [], window=2)
    msg = viz.message_figure("The text is empty")
    assert "empty" in msg.layout.annotations[0].text
    fig = viz.loss_by_distance_figure(["1-8", ">8"], {"dense": [1.0, 2.0], "dsa": [1.1, 2.1]}, [10, 20], window=8)
    assert len(fig.data) == 2
    fig = viz.selection_distance_figure([0, 1, 4], {"layer 0": [0.5, 0.5]})
    assert len(fig.data[0].x) == 2
    fig = viz.recall_stages_figure({"untrained": [0.2, 0.3], "trained": [0.8, 0.9]}, [0.5, 0.6])
    assert len(fig.data) == 3
    curve = {"step": [0, 1], "loss": [3.0, 2.0], "probe_step": [1], "probe_loss": [2.5]}
    fig = viz.lm_training_figure({"dense": curve, "dsa": curve}, branch=1)
    assert len(fig.data) == 4


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dslib import lm_train

    out = tmp_path_factory.mktemp("textlm")
    log, model = lm_train.run(out, lm_train.TrainSettings.tiny_run(), device="cpu", argv=["--tiny"], return_model=True)
    return out, log, model


def test_training_command_tiny_end_to_end(tiny_run):
    out, log, _ = tiny_run
    assert log["status"] == "done"
    assert sorted(log["artifact"]) == ["config.json", "model.safetensors", "textlm_log.json", "tokenizer.json"]
    on_disk = json.loads((out / "textlm_log.json").read_text())
    assert on_disk["status"] == "done" and not (out / "stages").exists()
    st = log["stages"]
    assert st["dense"]["steps"] == 6 and st["variants"]["steps"] == 6
    assert st["variants"]["dsa_warmup_steps"] + st["variants"]["dsa_sparse_steps"] == 6
    r = log["results"]
    assert set(r["matrix"]) == {"dense", "dsa", "window"}
    for v in r["by_variant"].values():
        assert sum(v["bucket_counts"]) == v["tokens"] and len(v["bucket_loss"]) == len(v["bucket_names"])
        assert len(v["nmi_class_expert"]) == len(v["moe_layers"]) and all(0 <= x <= 1 for x in v["nmi_class_expert"])
        total = sum(v["load"][0])
        assert total == v["tokens"] * log["config"]["num_experts_per_tok"]
    window = r["by_variant"]["window"].get("identifier_beyond_window")
    if window:  # a window never reaches beyond itself
        assert all(h == 0 for h in window["hit_rate"])
    for a in r["attention_analysis"].values():
        assert all(0 <= x <= 1 + 1e-5 for x in a["recall_indexer"] + a["recall_window"])
    assert "corpus" in log and log["corpus"]["files_eval"] > 0 and log["tokenizer"]["vocab_size"] == 512


def test_artifact_loads_and_reproduces_the_model_within_fp8(tiny_run):
    import dslib
    from dslib.checkpoint import FP8_DTYPE, SafetensorsSource, dequantize_fp8_blocks, is_fp8_weight, quantize_fp8_blocks
    from dslib.lm_train import load_textlm

    out, _, model = tiny_run
    specs = SafetensorsSource(out).specs()
    assert any(s.dtype == FP8_DTYPE for s in specs.values())
    assert specs["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = dslib.load_pretrained(out, progress=False)
    # what FP8 storage should give: every quantisable weight through its 128x128 blocks, the rest via bf16
    expected = {}
    for name, w in model.state_dict().items():
        if is_fp8_weight(name, tuple(w.shape)):
            expected[name] = dequantize_fp8_blocks(*quantize_fp8_blocks(w))
        elif name.endswith("e_score_correction_bias"):
            expected[name] = w.float()
        else:
            expected[name] = w.to(torch.bfloat16).float()
    got = loaded.state_dict()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    ids = torch.randint(0, model.config.vocab_size, (1, 100))
    with torch.no_grad():
        ref, new = model(ids), loaded(ids)
    rel = ((new - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # FP8 weights: a few percent at most
    lm, tok, log = load_textlm(out)
    assert log["status"] == "done" and tok.get_vocab_size() == model.config.vocab_size
    from dslib import viz

    fig = viz.lm_training_figure({"dense (a)": log["stages"]["dense"]["curve"], **log["stages"]["variants"]["curves"]},
                                 branch=log["stages"]["dense"]["steps"])
    assert len(fig.data) == 8


def test_inspect_text_and_bad_input(tiny_run):
    from dslib import viz
    from dslib.lm_train import TextInputError, inspect_text, load_textlm

    out, _, _ = tiny_run
    lm, tok, _ = load_textlm(out)
    cfg = lm.config
    a = inspect_text(lm, tok, SNIPPET)
    assert "".join(a.pieces) == SNIPPET and len(a.ids) == len(a.classes) == len(a.surprisal)
    k = cfg.index_topk
    for rows in a.selected.values():  # causal; exactly min(q + 1, k) keys
        assert all(sum(s >= 0 for s in row) == min(q + 1, k) and max(row) <= q for q, row in enumerate(rows))
    assert sorted(a.experts) == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for view in ("indexer selection", "experts", "token classes"):
        fig = viz.text_view_figure(a, view, 1, 10_000, n_experts=cfg.n_routed_experts, n_group=cfg.n_group,
                                   class_names=lm_data.TOKEN_CLASSES)
        assert fig.data and fig.data[0].type == "heatmap"
    dense_layer = viz.text_view_figure(a, "experts", 0, 0, n_experts=cfg.n_routed_experts)
    assert "dense layer" in dense_layer.layout.annotations[0].text
    with pytest.raises(TextInputError, match="empty"):
        inspect_text(lm, tok, "  \n")
    with pytest.raises(TextInputError, match="context holds 128 tokens"):
        inspect_text(lm, tok, "x = 1\n" * 200)
    with pytest.raises(FileNotFoundError, match="dslib.lm_train"):
        load_textlm(out / "nowhere")


def test_training_from_a_time_budget(tmp_path):
    """The GPU run's path: seconds per step measured first, step counts planned from the budget (the variants
    always at equal steps, even when the deadline stops them)."""
    from dslib import lm_train

    s = lm_train.TrainSettings.tiny_run(dense_steps=None, compare_steps=None, minutes=0.25, eval_reserve_s=4.0,
                                        eval_sequences=2)
    log = lm_train.run(tmp_path, s, device="cpu")
    plan, st = log["plan"], log["stages"]
    assert set(plan["seconds_per_step"]) == {"dense", "lockstep_warmup", "lockstep_sparse", "probe"}
    assert 1 <= st["dense"]["steps"] <= plan["dense_steps"] and 1 <= st["variants"]["steps"] <= plan["compare_steps"]
    assert st["variants"]["stopped_early"] == (st["variants"]["steps"] < plan["compare_steps"]
                                               or st["dense"]["steps"] < plan["dense_steps"])
    lengths = {len(c["loss"]) for c in st["variants"]["curves"].values()}
    assert len(lengths) == 1  # the three variants logged the same steps
    assert log["status"] == "done"
