import os

# The Triton kernels (chapter 6) are decorated when their modules load, and Triton decides then whether they run
# compiled or in its CPU interpreter. Decide once, before any test module (or transformers) imports triton:
# without a GPU, every kernel test runs in the interpreter.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are CPU, fp32, deterministic.
torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
