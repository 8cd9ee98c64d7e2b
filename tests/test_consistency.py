"""One definition of each shared number and style across the chapters (GQA-8 baseline, H200 memory, colours)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dslib import viz

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "build").glob("[0-9]*.py")) + sorted((ROOT / "dslib" / "exercises").glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_private_copy_of_the_h200_memory(path):
    """The notebooks and exercises size against `dslib.config.H200_MEMORY_BYTES`, never a number of their own."""
    code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
    literal = re.findall(r"\b(?:141|150\.75)e9\b|\b141\s*\*\s*2\s*\*\*\s*30\b", code)
    allowed = {"141e9"} if path.name == "ch1.py" else set()  # ch1 recognises the marketed number as a mistake
    assert set(literal) <= allowed, f"{path.name} hard-codes the H200's memory: {literal}; use H200_MEMORY_BYTES"


def test_each_attention_method_has_its_own_colour_in_the_accuracy_figure():
    results = {name: {"≤16": 1.0} for name in ("dense", "sparse", "window", "window 2k", "window trained")}
    fig = viz.accuracy_by_distance_figure(results, chance=1 / 64)
    colors = [bar.marker.color for bar in fig.data]
    assert None not in colors and len(set(colors)) == 5, colors
    assert [bar.name for bar in fig.data] == ["dense", "indexer top-k", "sliding window", "sliding window 2k",
                                              "window-trained model, window k"]


def test_absorbed_decode_is_above_the_h200_ridge():
    """Chapter 2's roofline claim: MLA decode with 128 heads does 242 FLOP/B, above the bf16 ridge of ~206."""
    from dslib.config import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, ModelConfig
    from dslib.cost import attention_flops, kv_bytes_read

    big, n = ModelConfig.deepseek_v32(), 131_072
    intensity = attention_flops(big, 1, n, "absorbed")["total"] / kv_bytes_read(big, n, "absorbed")
    ridge = H200_BF16_FLOPS / H200_HBM_BYTES_PER_S
    assert round(intensity) == 242 and round(ridge) == 206 and intensity > ridge


def test_readme_says_what_runs_where():
    """The README must not claim that chapter 5 runs DeepSeek's real model or weights."""
    readme = (ROOT / "README.md").read_text()
    assert "What runs where in chapter 5" in readme and "meta" in readme
    for claim in ("runs the very same modules", "loads its official checkpoint", "loads transformers' own"):
        assert claim not in readme, f"README overstates chapter 5: {claim!r}"
