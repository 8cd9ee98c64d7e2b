"""Chapter 5's benchmark scripts run their logic on CPU with a tiny config (the GPU numbers come from an H200)."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch

from dslib.checkpoint import RandomSource, load_layer, load_pretrained
from dslib.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_layer_equals_the_layer_of_the_whole_model():
    cfg = ModelConfig.tiny(index_n_heads=8)
    source = RandomSource(cfg, seed=5, fp8=True)
    layer = load_layer(source, 1, dtype=torch.float32)
    whole = load_pretrained(source, progress=False)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, whole.model.layers[1].state_dict()[name]), name


def test_gpu_layer_script_tiny_on_cpu(tmp_path):
    _script("gpu_layer").main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    attention = list(csv.DictReader(open(tmp_path / "gpu_attention.csv")))
    moe = list(csv.DictReader(open(tmp_path / "gpu_moe.csv")))
    assert {(r["phase"], r["variant"]) for r in attention} >= {
        ("prefill", "sparse"), ("prefill", "dense_sdpa"), ("prefill", "dense_naive"), ("prefill", "indexer"),
        ("decode", "sparse"), ("decode", "dense_absorbed"), ("decode", "dense_naive")}
    assert all(float(r["median_ms"]) > 0 for r in attention + moe)
    assert {r["block"] for r in moe} == {"moe", "dense_mlp"}
    assert torch.get_num_threads() >= 1
