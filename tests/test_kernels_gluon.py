"""The Gluon sparse MLA kernel (dslib/kernels/sparse_mla_gluon.py, `sparse_mla(variant="gluon")`).

Gluon has no CPU interpreter, so on CPU this file checks what can be checked without a GPU: the kernel compiles for
Hopper (sm_90a) with the installed Triton, with the layout it is built for (warps [4, 2] in both products), within
one SM's shared memory and without register spills; and the variant's errors and fallbacks. On a Hopper GPU it
compares the kernel with fp32 PyTorch and the one-pass kernel at the 671B widths.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from dslib.kernels import triton_version  # noqa: E402  (reads the version only; imports no Triton)

ROOT = Path(__file__).resolve().parents[1]
NEW_ENOUGH = triton_version() is not None and triton_version()[:2] >= (3, 6)
needs_gluon = pytest.mark.skipif(not NEW_ENOUGH, reason=f"Gluon needs Triton >= 3.6, found {triton_version()}")

COMPILE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
from kernel_resources import report
from dslib.kernels import sparse_mla_gluon as g
out = []
for sel, C, R in (("*i32", 512, 64), ("*i64", 64, 16)):
    consts = dict(C=C, R=R, BLOCK_H=g.BLOCK_H, BLOCK_N=g.BLOCK_N, NUM_BUF=g.NUM_BUF, SWIZZLE_C=g.swizzle(C),
                  SWIZZLE_R=g.swizzle(R), num_warps=g.NUM_WARPS)
    out.append(report(g._sparse_mla_kernel, {"sel_ptr": sel, "qk_scale": "fp32"}, consts, g.NUM_WARPS, 1))
print("RESULT", json.dumps(out))
"""


@needs_gluon
def test_gluon_kernel_compiles_for_hopper():
    """Offline sm_90a compile (no GPU) at the 671B widths (C 512, R 64, int32 selection) and a small one (C 64,
    R 16, int64): both products split over warps [4, 2], at most the 227 KB of shared memory a block may use, no
    spills. Catches a Triton whose Gluon renamed what the kernel calls (3.6 -> 3.9 renamed two functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    proc = subprocess.run([sys.executable, "-c", COMPILE, str(ROOT)], capture_output=True, text=True, env=env,
                          timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    full, small = json.loads(line.removeprefix("RESULT "))
    for r in (full, small):
        assert r["fits"] and r["spill_bytes"] == 0, r
        assert r["mma_warps"] and set(r["mma_warps"]) == {"4x2"}, r
        assert r["cp_async"] > 0, r  # the gather is asynchronous
    assert full["mma_warps"] == ["4x2", "4x2"]  # scores and weighted sum
    assert 200 <= full["shared_kb"] <= 227, full  # q 72 KB + two buffers of 64 rows × 576 × 2 bytes = 216 KB


def test_shape_limits_are_named():
    pytest.importorskip("triton.experimental.gluon")
    from dslib.kernels import sparse_mla_gluon as g

    assert g.shape_problem(torch.bfloat16, 128, 512, 64, True) is None
    assert "bf16" in g.shape_problem(torch.float16, 128, 512, 64, True)
    assert "multiple of 64 heads, got H = 16" in g.shape_problem(torch.bfloat16, 16, 512, 64, True)
    assert "C = 384" in g.shape_problem(torch.bfloat16, 128, 384, 64, True)
    assert "R = 128" in g.shape_problem(torch.bfloat16, 128, 512, 128, True)
    assert "32-bit" in g.shape_problem(torch.bfloat16, 128, 512, 64, False)
    assert g.swizzle(512) == 128 and g.swizzle(16) == 32


def _inputs(B, T, H, C, R, S, k, device, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    qa = torch.randn(B, T, H, C, generator=g, device=device).to(dtype)
    qr = torch.randn(B, T, H, R, generator=g, device=device).to(dtype)
    cache = torch.randn(B, S, C + R, generator=g, device=device).to(dtype)
    sel = torch.randint(0, S, (B, T, k), generator=g, device=device)
    sel[:, :, ::7] = -1  # empty slots
    sel[:, 0, 3] = S + 5  # past the cache: treated as none
    sel[:, 1] = -1  # a query with no key at all gets 0
    return qa, qr, cache[..., :C], cache[..., C:], sel


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU errors")
def test_gluon_variant_on_cpu_says_why_not():
    from dslib.kernels import sparse_mla as kmla  # conftest.py set TRITON_INTERPRET=1 (no GPU)

    qa, qr, lat, kr, sel = _inputs(1, 4, 64, 32, 16, 40, 8, "cpu", dtype=torch.float32)
    problem = kmla.gluon_problem(qa, lat, kr)
    assert problem is not None and ("interpreter" in problem or "CUDA" in problem or "Triton" in problem)
    if kmla.interpreting():
        with pytest.raises(ValueError, match="variant='gluon'.*Use variant='one_pass'"):
            kmla.sparse_mla(qa, qr, lat, kr, sel, 0.1, variant="gluon")
        with pytest.raises(ValueError, match="fixed tiles"):
            kmla._variant_config("gluon", kmla.SPARSE_CONFIG, dict(BLOCK_N=16))
        with pytest.raises(ValueError, match="dense_mla has no Gluon kernel"):
            kmla.dense_mla(qa, qr, lat, kr, torch.arange(4), 0.1, variant="gluon")
        assert kmla._auto_variant(4096, qa, lat, kr) == "one_pass"  # no Gluon here: the one-pass kernel


hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                            reason="needs a Hopper GPU")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@hopper
@pytest.mark.parametrize("B, T, H, C, R, S, k, idx_dtype", [(2, 40, 128, 512, 64, 3000, 2000, torch.int64),
                                                            (1, 300, 64, 64, 16, 700, 128, torch.int32)])
def test_gluon_matches_fp32_and_one_pass_on_the_gpu(B, T, H, C, R, S, k, idx_dtype):
    """Full width (k = 2000: padded to a multiple of 64) and a small width: within bf16 rounding of fp32 PyTorch
    and of the one-pass kernel, -1 slots and indices >= S ignored, a query with no key gets 0."""
    import dslib.kernels as kernels
    from dslib.kernels import sparse_mla as kmla
    from dslib.sparse import sparse_attention

    qa, qr, lat, kr, sel = _inputs(B, T, H, C, R, S, k, "cuda")
    sel = sel.to(idx_dtype)
    assert kmla.gluon_problem(qa, lat, kr) is None
    scale = (C // 4 + R) ** -0.5
    got = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="gluon")
    one = kmla.sparse_mla(qa, qr, lat, kr, sel, scale, variant="one_pass")
    ref = torch.nan_to_num(sparse_attention(qa.float(), qr.float(), lat.float(), kr.float(),
                                            sel.long().where(sel < S, -1), scale), nan=0.0)
    assert torch.isfinite(got).all() and (got[:, 1] == 0).all()
    assert _rel(got, ref) < 1e-2 and _rel(got, one) < 1e-2
    assert _rel(got, ref) < 1.5 * _rel(one, ref) + 1e-3  # no worse than the shipped kernel
    assert kmla._auto_variant(T, qa, lat, kr) == ("gluon" if kmla.GLUON_BY_DEFAULT else "one_pass")
    if kmla.GLUON_BY_DEFAULT and not kernels.tuned("sparse_prefill"):  # a call without variant= takes it
        assert torch.equal(kmla.sparse_mla(qa, qr, lat, kr, sel, scale), got)
    saved = dict(kernels.TUNED)
    kernels.TUNED["sparse_prefill"] = {"variant": "gluon"}  # as a tuning file that chose it
    try:
        assert torch.equal(kmla.sparse_mla(qa, qr, lat, kr, sel, scale), got)
        few = [x[:, :4] for x in (qa, qr)] + [lat, kr, sel[:, :4], scale]  # decode (T <= 8): not its case
        assert torch.equal(kmla.sparse_mla(*few), kmla.sparse_mla(*few, variant="one_pass"))
    finally:
        kernels.TUNED.clear()
        kernels.TUNED.update(saved)


def test_notebook06_says_whether_gluon_is_the_default():
    """Notebook 06 tells learners the Gluon kernel is not yet the default; whoever flips GLUON_BY_DEFAULT (after its
    GPU test) must change that sentence too."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "06_full_size_gpu.ipynb", as_version=4)
    text = " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())
    source = (ROOT / "dslib" / "kernels" / "sparse_mla.py").read_text()
    by_default = "GLUON_BY_DEFAULT = True" in source
    assert by_default or "GLUON_BY_DEFAULT = False" in source
    assert ("It has not yet replaced the one-pass kernel as the default" in text) == (not by_default)
