"""One sparse MLA prefill launch at full width, for Nsight Compute (ncu): T queries at the end of a 128K cache.

    ncu --set full -k regex:_sparse_mla -c 1 python benchmarks/ncu_sparse_mla.py     # on a GPU machine
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_kernels as bench  # noqa: E402

from dslib.kernels import sparse_mla as kmla  # noqa: E402

T, S = int(sys.argv[1]) if len(sys.argv) > 1 else 1024, 131072
run = bench.Run(Path("/tmp/ncu"), "full", torch.device("cuda"), bench.FULL_DIMS, budget_s=60)
qa, qr, lat, kr = bench.mla_inputs(run, 1, T, S, seed=1)
sel = bench.strided_selection(torch.arange(S - T, S, device="cuda"), 2048, 1, seed=2)
cfg = dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=2)
for _ in range(2):
    kmla.sparse_mla(qa, qr, lat, kr, sel, 192 ** -0.5, variant="one_pass", config=cfg)
torch.cuda.synchronize()
