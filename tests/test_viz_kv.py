"""Chapter 1 figures: pure functions returning plotly figures."""
import plotly.graph_objects as go
import pytest

from dslib import viz
from dslib.viz import kv


def test_all_listed_and_exported():
    for name in kv.__all__:
        assert getattr(viz, name) is getattr(kv, name)


def test_step_time_figure():
    fig = kv.step_time_figure([10, 11, 12], {"with cache": [0.001] * 3, "without cache": [0.002, 0.003, 0.004]})
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    assert list(fig.data[1].y) == pytest.approx([2, 3, 4])  # milliseconds
    assert fig.data[0].line.color != fig.data[1].line.color
    with pytest.raises(ValueError, match="2 values for 3 context lengths"):
        kv.step_time_figure([1, 2, 3], {"with cache": [1, 2]})


def test_memory_vs_compute_figure():
    lens = [1, 2, 4]
    fig = kv.memory_vs_compute_figure(lens, [10, 20, 40], [1, 4, 16], cache_formula=[10, 20, 40],
                                      flops_formula=[1, 4, 16])
    assert len(fig.data) == 4 and fig.data[1].xaxis == "x" and fig.data[3].xaxis == "x2"
    assert len(kv.memory_vs_compute_figure(lens, [1, 2, 3], [1, 2, 3]).data) == 2
    with pytest.raises(ValueError, match="sequence lengths"):
        kv.memory_vs_compute_figure(lens, [1, 2], [1, 2, 3])


def test_attention_time_figure():
    fig = kv.attention_time_figure([100, 200, 400], [0.01, 0.04, 0.16], exponent=2.0)
    assert len(fig.data) == 2 and fig.layout.xaxis.type == "log"
    assert fig.data[1].y[0] == pytest.approx(10.0)  # the fit passes through the last point: 160 ms / 16
    with pytest.raises(ValueError):
        kv.attention_time_figure([1, 2], [1.0])


def test_kv_memory_figure():
    sizes = {"MHA (x)": 600e9, "GQA-8": 40e9, "MLA-FP8": 5e9, "MLA-FP8 + indexer keys": 6e9}
    fig = kv.kv_memory_figure(sizes, capacity_bytes=141e9, capacity_name="one H200")
    bars = fig.data[0]
    assert list(bars.y) == pytest.approx([600, 40, 5, 6])
    assert "426% of one H200" in bars.text[0] and len(set(bars.marker.color)) == 4
    assert fig.layout.yaxis.type == "log" and fig.layout.annotations[0].text == "one H200: 141 GB"
    assert fig.layout.annotations[0].y == pytest.approx(2.149, abs=1e-3)  # log10(141): annotation in log units
    assert kv.kv_memory_figure(sizes, log_y=False).layout.yaxis.type is None


def test_param_accounting_figure():
    fig = kv.param_accounting_figure({"experts": 600e9, "attention": 70e9}, {"experts": 30e9, "attention": 70e9})
    assert len(fig.data) == 2 and fig.layout.barmode == "stack"
    assert list(fig.data[0].x) == [30, 600]
    assert {a.text for a in fig.layout.annotations} == {"100.0B", "670.0B"}
    assert fig.layout.legend.y < 0  # below the bars: several entries would cover the title
