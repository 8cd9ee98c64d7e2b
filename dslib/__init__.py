"""dslib — DeepSeek-V3.2's efficiency ideas, rebuilt chapter by chapter.

Chapter order (a module imports only modules of its own or earlier chapters; tests/test_hygiene.py checks it):

1. config, fp8, cost, kv_cache, attention, viz, show   — KV caching, memory and FLOP accounting, FP8 numbers
2. rope, mla                                — Multi-head Latent Attention
3. indexer, sparse, tasks, train            — DeepSeek Sparse Attention (lightning indexer + top-k)
4. moe                                      — mixture-of-experts routing and balancing
5. model, checkpoint, devices               — the whole DeepSeek-V3.2 and its checkpoint format
"""
from dslib.config import ModelConfig
from dslib.show import show

__version__ = "0.1.0"
__all__ = ["ModelConfig", "show", "load_pretrained"]


def __getattr__(name):
    # Chapter-5 entry points load lazily, so `import dslib` in chapter 1 imports only chapter-1 code.
    if name == "load_pretrained":
        from dslib.checkpoint import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'dslib' has no attribute {name!r}")
