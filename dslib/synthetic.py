"""Synthetic full-size weights made on the GPU, synthetic checkpoints and a test tokenizer (chapter 6).

The full 671B checkpoint (642 GiB) fits on no disk of the machines this series runs on, so full-size runs use
seeded synthetic weights with the checkpoint's names, shapes and dtypes. `SyntheticFP8Source` makes them fast,
directly in the stored format, on the device that will use them:

    FP8 weight  q[i, j] = e4m3( clamp(N(0, 64^2), -448, 448) )      one bf16 normal draw, rounded once to e4m3
    its scales  weight_scale_inv[a, b] = 2^(e - r[a, b]),  r ~ {0, 1}  a power of two per 128 x 128 block
    so that     W = q * scale has std ~ initializer_range (0.02), like `RandomSource`

No fp32 copy of the weight and no amax pass: that is what makes it ~10x faster than `RandomSource` + FP8
quantisation. Everything else follows `RandomSource` (bf16 normals for the embedding, head, router and
indexer head weights; norms 1; router bias N(0, 0.01)). Every tensor has its own seed derived from
(seed, name), so a layer is the same whether it is made alone, streamed, or written to disk; values depend on
the device type (CPU and CUDA random generators differ).

It is a `TensorSource`, so it loads through exactly the code that loads a checkpoint folder
(`dslib.checkpoint.load_layer`, `load_pretrained`) and `write_checkpoint` turns it into one.

    write_synthetic_fp8_checkpoint(cfg, path, seed)   the official layout (config.json + shards + index)
    train_test_tokenizer(path, texts, vocab_size)     a byte-level BPE tokenizer.json trained by `tokenizers`
    file_checksums(path)                              sha256 of every file of a folder (to prove nothing changed)
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dslib.checkpoint import (
    SCALE_SUFFIX,
    TensorSource,
    TensorSpec,
    _seed_of,
    checkpoint_tensors,
    fp8_quantization_config,
    layer_of,
    write_checkpoint,
)
from dslib.config import FP8_BLOCK, ModelConfig
from dslib.fp8 import FP8_DTYPE, FP8_MAX

__all__ = ["SyntheticFP8Source", "SIGMA_Q", "write_synthetic_fp8_checkpoint", "train_test_tokenizer",
           "file_checksums", "BOS_TOKEN", "EOS_TOKEN"]

SIGMA_Q = 64.0  # std of the e4m3 codes: 7 sigma below the largest e4m3 value (448), well above the subnormals
BOS_TOKEN, EOS_TOKEN = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's ids 0 and 1


class SyntheticFP8Source(TensorSource):
    """Seeded synthetic weights in the FP8 release's format, generated directly as e4m3 codes and power-of-two
    block scales on `device` (one group per layer, like `RandomSource`).

    Linear weights stored in FP8 get codes ~ N(0, SIGMA_Q^2) clamped to +-448 and scales 2^(e - r), r in {0, 1} per
    128 x 128 block, with e chosen so that the dequantised weight's std is about `initializer_range`.
    config.json's quantization_config says scale_fmt "ue8m0" (power-of-two scales), as in DeepSeek-V3.2's release.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.bfloat16):
        self.config = cfg.replace(quantization_config=fp8_quantization_config("ue8m0", FP8_BLOCK))
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU: compare as "cuda:i"
            device = torch.device("cuda", torch.cuda.current_device())
        self.seed, self.device, self.dtype = seed, device, dtype
        self._specs = checkpoint_tensors(self.config, fp8=True, dtype=dtype)
        self.description = f"synthetic FP8 weights (seed {seed}, made on {self.device.type})"
        # scale exponent: std(q * 2^(e - r)) = SIGMA_Q * 2^e * sqrt((1 + 1/4) / 2)
        self.scale_exponent = round(math.log2(cfg.initializer_range / (SIGMA_Q * math.sqrt(0.625))))
        self._groups: list[tuple[str, list[str]]] | None = None

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def groups(self) -> list[tuple[str, list[str]]]:
        if self._groups is None:
            groups: dict[str, list[str]] = {}
            for name in self._specs:
                layer = layer_of(name)
                groups.setdefault("embeddings+head" if layer is None else f"layer {layer}", []).append(name)
            self._groups = list(groups.items())
        return list(self._groups)

    @contextlib.contextmanager
    def open(self, group: str):
        yield self.make

    def weight_std(self) -> float:
        """The std of a dequantised FP8 weight (from SIGMA_Q and the scale exponent; ~ initializer_range)."""
        return SIGMA_Q * 2.0**self.scale_exponent * math.sqrt(0.625)

    def make(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored tensor `name`, generated on `self.device`. With `out` (a parameter slot of the stored dtype,
        shape and device) it is written there and `out` is returned; otherwise a new tensor (the loader then
        dequantises or casts it)."""
        spec = self._specs[name]
        if out is not None and (out.dtype != spec.dtype or tuple(out.shape) != spec.shape or out.device != self.device):
            out = None
        gen = torch.Generator(device=self.device).manual_seed(_seed_of(self.seed, name))
        if name.endswith(SCALE_SUFFIX):
            r = torch.randint(0, 2, spec.shape, generator=gen, device=self.device)
            return _stored(torch.exp2(self.scale_exponent - r.float()), out)
        if spec.dtype == FP8_DTYPE:
            codes = torch.empty(spec.shape, dtype=torch.bfloat16, device=self.device)
            codes.normal_(0.0, SIGMA_Q, generator=gen)
            codes.clamp_(-FP8_MAX, FP8_MAX)  # e4m3fn has no inf: a cast beyond 448 would give NaN
            return _stored(codes, out, FP8_DTYPE)
        target = out if out is not None else torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        if name.endswith("e_score_correction_bias"):
            return target.normal_(0.0, 0.01, generator=gen)
        if len(spec.shape) == 1:  # norm weights 1, the indexer LayerNorm's bias 0
            return target.fill_(0.0 if name.endswith(".bias") else 1.0)
        return target.normal_(0.0, self.config.initializer_range, generator=gen)


def _stored(value: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`value` cast to the stored dtype, written into `out` when there is one (the cast happens in the copy)."""
    if out is not None:
        return out.copy_(value)
    return value.to(dtype) if dtype is not None else value


def write_synthetic_fp8_checkpoint(cfg: ModelConfig, path: str | Path, *, seed: int = 0,
                                   device: str | torch.device = "cpu", **kwargs) -> Path:
    """A checkpoint folder in the official FP8 layout made from `SyntheticFP8Source` (kwargs: `write_checkpoint`'s,
    e.g. max_shard_bytes). Loading it gives bit for bit the weights the source makes on the same device type."""
    return write_checkpoint(SyntheticFP8Source(cfg, seed, device=device), path, fp8=True, **kwargs)


def train_test_tokenizer(path: str | Path, texts: list[str], vocab_size: int) -> Path:
    """Train a byte-level BPE `tokenizer.json` on `texts` with the `tokenizers` library and save it as
    path/tokenizer.json. Ids 0 and 1 are DeepSeek's begin/end-of-sentence tokens (config bos/eos 0/1), so a
    checkpoint of any vocab_size >= `vocab_size` can use it. For tests and synthetic checkpoints: trained here on
    the project's own text, it splits words the way a real tokenizer does, but it is not DeepSeek's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return out


def _sha256(file: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(path: str | Path, *, threads: int = 8) -> dict[str, str]:
    """sha256 of every file in the folder `path` (name -> hex digest), hashed in parallel threads (hashlib releases
    the GIL on large buffers). Compare two calls to show that a run changed no file of a checkpoint."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = list(pool.map(_sha256, files))
    return {f.name: d for f, d in zip(files, digests)}
