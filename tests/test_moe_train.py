"""Chapter 4: the experiment's tasks, model, training loop and artifacts (tiny sizes, seconds)."""
from __future__ import annotations

import json

import pytest
import torch

from dslib import moe_train as mt
from dslib.mla import MLA
from dslib.moe import MoE


def test_tasks_produce_the_documented_answers():
    g = torch.Generator().manual_seed(0)
    seqs, tasks = mt.make_batch(len(mt.TASKS), g, torch.arange(len(mt.TASKS)))
    assert seqs.shape == (len(mt.TASKS), mt.SEQ_LEN) and seqs.max() < mt.VOCAB
    text = {mt.TASKS[int(t)]: mt.describe(s) for s, t in zip(seqs, tasks)}
    for name, line in text.items():
        head, answer = line.split(" | ")
        assert head.startswith(name + ": ")
        x = head[len(name) + 2:]
        assert len(x) == len(answer) == mt.N_ITEMS
        if name == "copy":
            assert answer == x
        elif name == "reverse":
            assert answer == x[::-1]
        elif name == "shift":
            assert answer == "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in x)
        elif name == "swap_pairs":
            assert answer[:2] == x[1] + x[0] and answer[-1] == x[-1]
        elif name == "sort":
            assert answer == "".join(sorted(x))
        elif name == "running_max":
            assert answer == "".join(max(x[: i + 1]) for i in range(len(x)))
        elif name == "complement":
            assert answer == "".join(str(9 - int(c)) for c in x)
        elif name == "bracket_depth":
            depth = [x[: i + 1].count("(") - x[: i + 1].count(")") for i in range(len(x))]
            assert answer == "".join(map(str, depth)) and min(depth) >= 0


def test_loss_only_on_answers():
    seqs, _ = mt.make_batch(4, torch.Generator().manual_seed(1))
    inputs, targets = mt.inputs_and_targets(seqs)
    assert inputs.shape == targets.shape == (4, mt.SEQ_LEN - 1)
    assert (targets != mt.IGNORE).sum(1).tolist() == [mt.N_ITEMS] * 4
    assert (inputs[:, mt.N_ITEMS + 1] == mt.SEP).all()  # the answer's first token is predicted at SEP


def test_model_uses_dslib_moe_and_records_routing():
    cfg = mt.model_config()
    model = mt.MoELM(cfg)
    assert all(isinstance(layer.mlp, MoE) and isinstance(layer.self_attn, MLA) for layer in model.layers)
    assert cfg.n_routed_experts // cfg.n_group == 4 and cfg.topk_group * 2 == cfg.n_group  # V3.2's shape / 8
    log = mt.RoutingLog()
    logits = model(torch.randint(0, mt.VOCAB, (2, 31)), recorder=log)
    assert logits.shape == (2, 31, mt.VOCAB)
    assert sorted(log.by_layer) == [0, 1] and log.by_layer[1].topk_idx.shape == (62, cfg.num_experts_per_tok)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, mt.SEQ_LEN + 1, dtype=torch.long))


def test_settings_behave_as_described():
    """A few steps per setting: aux adds a loss term, bias moves the gate's buffer, none touches neither."""
    small = dict(steps=6, batch_size=8, eval_every=3, eval_per_task=2, model=dict(hidden_size=32))
    out = {}
    for setting in mt.SETTINGS:
        model, log = mt.train(mt.TrainConfig(setting=setting, **small), progress=False)
        out[setting] = (model, log)
        assert log["eval_steps"] == [0, 3, 6] and len(log["train_loss"]) == 6
        assert len(log["eval_load"][0]) == 2 and sum(log["eval_load"][0][0]) == 16 * 31 * 8
        final = log["final"]
        assert len(final["task_accuracy"]) == len(mt.TASKS) and len(final["task_expert"]) == 2
        assert max(i for i, c in enumerate(final["groups_touched"][0]) if c) <= 4  # group limit holds
        assert sum(final["groups_touched_unlimited"][0]) == 16 * 31
    bias = out["bias"][0].layers[0].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    assert out["none"][0].layers[0].mlp.gate.e_score_correction_bias.abs().sum() == 0
    assert out["aux"][0].layers[0].mlp.gate.e_score_correction_bias.abs().sum() == 0
    # same seed, same data: 'none' and 'aux' differ only by the aux loss
    assert out["none"][1]["train_loss"][0] == out["aux"][1]["train_loss"][0]
    assert out["none"][1]["train_loss"][-1] != out["aux"][1]["train_loss"][-1]
    # the aux variants: DeepSeek's alpha, and the same loss over the whole batch
    alphas = {s: out[s][1]["config"]["alpha"] for s in ("aux", "aux_small", "aux_batch")}
    assert alphas == {"aux": 1e-2, "aux_small": 1e-4, "aux_batch": 1e-2}
    assert out["aux"][1]["train_loss"][-1] != out["aux_batch"][1]["train_loss"][-1]
    assert out["aux_small"][1]["train_loss"][-1] != out["aux"][1]["train_loss"][-1]
    with pytest.raises(ValueError, match="choose one of"):
        mt.TrainConfig(setting="both")


def test_save_and_load_roundtrip(tmp_path):
    model, log = mt.train(mt.TrainConfig(setting="bias", steps=2, batch_size=4, eval_every=1, eval_per_task=1),
                          progress=False)
    mt.save(tmp_path, {"bias": model}, {"bias": log})
    models, logs = mt.load(tmp_path)
    assert json.loads(json.dumps(logs)) == logs and logs["bias"]["eval_steps"] == [0, 1, 2]
    for k, v in model.state_dict().items():
        assert torch.equal(models["bias"].state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="python -m dslib.moe_train"):
        mt.load(tmp_path / "nowhere")
    # saving other settings later keeps the ones already there
    other, other_log = mt.train(mt.TrainConfig(setting="none", steps=1, batch_size=4, eval_every=1, eval_per_task=1),
                                progress=False)
    mt.save(tmp_path, {"none": other}, {"none": other_log})
    assert list(mt.load(tmp_path)[1]) == ["none", "bias"]


def test_normalised_mutual_information_limits():
    assert mt.normalised_mutual_information(torch.eye(4) * 10) == pytest.approx(1.0)
    assert mt.normalised_mutual_information(torch.ones(4, 6)) == pytest.approx(0.0, abs=1e-12)


def test_lr_schedule():
    t = mt.TrainConfig(steps=1000, warmup=100, lr=1e-2)
    assert mt.lr_at(0, t) == pytest.approx(1e-4) and mt.lr_at(99, t) == pytest.approx(1e-2)
    assert mt.lr_at(1000, t) == pytest.approx(1e-3)


@pytest.mark.slow
def test_parallel_training_gives_the_same_models():
    """--jobs trains settings in separate processes, one thread each: same numbers as one after the other."""
    small = dict(steps=2, batch_size=8, eval_per_task=2, progress=False)
    seq_models, seq_logs = mt.train_all(("none", "bias"), jobs=1, **small)
    par_models, par_logs = mt.train_all(("none", "bias"), jobs=2, **small)
    for s in ("none", "bias"):
        assert seq_logs[s]["train_loss"] == par_logs[s]["train_loss"]
        for k, v in seq_models[s].state_dict().items():
            assert torch.equal(par_models[s].state_dict()[k], v), k
