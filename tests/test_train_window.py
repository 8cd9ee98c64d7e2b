"""Chapter 3's fair baseline: the window model is trained (from the dense checkpoint, the sparse stage's budget)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dslib import train

DATA = Path(__file__).resolve().parents[1] / "data"


def test_window_variant_trains_from_the_dense_checkpoint(tmp_path):
    shutil.copy(DATA / "ch3_recall_dense.safetensors", tmp_path)
    log, result = train.train_window_variant(tmp_path, steps=2, eval_size=4, progress=False)
    assert log.stage == "window" and log.steps == 2
    paths = train.artifact_paths(tmp_path)
    trained, dense = train.load_model(paths[train.WINDOW]), train.load_model(paths["dense"])
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), dense.state_dict().values())]
    assert any(changed)  # the main model moved
    assert set(result) == {"dense", "window", "window_2k", "analysis"}
    assert result["window"]["k"] == trained.config.index_topk


def test_shipped_window_baseline_is_logged():
    import json

    log = json.loads((DATA / "ch3_recall.json").read_text())
    assert log["stages"][train.WINDOW]["steps"] == log["stages"]["sparse"]["steps"]  # the same budget
    assert (DATA / "ch3_recall_window.safetensors").is_file() and "--window-only" in log["window_command"]
