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
    # every case of the tiny plan ran (none skipped) with 3..50 repetitions; MHA-mode decode only while it fits
    script = _script("gpu_layer")
    sizes = script.TINY
    cases = {(r["phase"], r["variant"], int(r["context"]), int(r["batch"])) for r in attention}
    for L in sizes["prefill"]:
        assert {("prefill", v, L, 1) for v in ("sparse", "indexer", "dense_sdpa")} <= cases
    for B in sizes["decode_batch"]:
        for L in sizes["decode"]:
            naive = ("decode", "dense_naive", L, B) in cases
            assert naive == (B * L <= sizes["naive_decode_max"]) and ("decode", "sparse", L, B) in cases
    assert all(3 <= int(r["reps"]) <= 50 and not r["note"] for r in attention + moe)
