"""The official checkpoint format: tensor table, FP8 blocks, sources, writer and `load_pretrained` (chapter 5).

How a weight is *stored* lives here; how a layer *computes* lives in the chapter modules. The two meet only in
`load_pretrained`, which turns stored tensors (bf16, or e4m3 + `weight_scale_inv` blocks) into the parameters of
`dslib.model.DeepseekV32ForCausalLM`, whose `state_dict()` names are the checkpoint's names.

    checkpoint_tensors(cfg)      the tensor table of a checkpoint: name -> (shape, dtype), REFERENCE.md §7.1
    quantize_fp8_blocks(w)       W -> (W_e4m3, weight_scale_inv), one fp32 scale per 128 x 128 block
    dequantize_fp8_blocks(q, s)  W[i, j] = float(q[i, j]) * s[i // 128, j // 128]          (REFERENCE.md §7.2)
    TensorSource                 where tensors come from, one group (shard) at a time:
      SafetensorsSource(path)      model.safetensors, or model.safetensors.index.json + shards (lazily)
      RandomSource(cfg, seed)      seeded random tensors with the checkpoint's names, shapes and dtypes
      StateDictSource(sd, cfg)     an in-memory state dict (what `save_pretrained` writes)
    write_checkpoint(src, path)  config.json + sharded safetensors + index, optionally FP8-quantised
    load_pretrained(path)        the model: allocated once, then filled one tensor at a time (extra host memory
                                 ~ one tensor, not the checkpoint); keep_fp8=True keeps FP8 weights as stored
    load_layer(path, i)          one decoder layer, read the same way (full-size layers on one GPU)
    FP8Linear                    a Linear that holds its weight as e4m3 + block scales (the checkpoint's tensors)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dslib.config import FP8_BLOCK, ModelConfig

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
SCALE_SUFFIX = "_scale_inv"  # `x.weight` is stored with `x.weight_scale_inv`
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# 2-D weights that stay bf16 in the official FP8 checkpoint (REFERENCE.md §7.1): embeddings, the head, the
# router and the indexer's head weights (the MTP's eh_proj too).
NOT_QUANTIZED = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight",
                 "eh_proj.weight", "shared_head.head.weight")
# Tensors kept in fp32 whatever the model dtype (the router's selection bias is fp32 on disk and in HF).
KEEP_FP32 = ("e_score_correction_bias",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written. The message names the file/tensor and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# The tensor table
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """Shape and storage dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Is this tensor an FP8-quantised linear weight in the official checkpoint? (2-D `.weight` of a Linear,
    except the embedding, the head, the router and the indexer's weights_proj.)"""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(NOT_QUANTIZED)


def scale_shape(shape: tuple[int, int], block: int = FP8_BLOCK) -> tuple[int, int]:
    """`weight_scale_inv` shape for a weight of `shape`: ceil(out / 128) x ceil(in / 128)."""
    return (math.ceil(shape[0] / block), math.ceil(shape[1] / block))


def _layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Name (relative to the checkpoint root) -> shape, for decoder layer i."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    p = f"model.layers.{i}."
    t: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
    }
    a = p + "self_attn."
    if cfg.q_lora_rank:
        t[a + "q_a_proj.weight"] = (cfg.q_lora_rank, d)
        t[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        t[a + "q_b_proj.weight"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        t[a + "q_proj.weight"] = (h * cfg.qk_head_dim, d)
    t[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
    t[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    t[a + "kv_b_proj.weight"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    t[a + "o_proj.weight"] = (d, h * cfg.v_head_dim)
    x = a + "indexer."
    t[x + "wq_b.weight"] = (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank or d)
    t[x + "wk.weight"] = (cfg.index_head_dim, d)
    t[x + "k_norm.weight"] = (cfg.index_head_dim,)
    t[x + "k_norm.bias"] = (cfg.index_head_dim,)
    t[x + "weights_proj.weight"] = (cfg.index_n_heads, d)
    m = p + "mlp."
    if cfg.is_moe_layer(i):
        t[m + "gate.weight"] = (cfg.n_routed_experts, d)
        t[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            t[m + f"experts.{e}.gate_proj.weight"] = (cfg.moe_intermediate_size, d)
            t[m + f"experts.{e}.up_proj.weight"] = (cfg.moe_intermediate_size, d)
            t[m + f"experts.{e}.down_proj.weight"] = (d, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            width = cfg.moe_intermediate_size * cfg.n_shared_experts
            t[m + "shared_experts.gate_proj.weight"] = (width, d)
            t[m + "shared_experts.up_proj.weight"] = (width, d)
            t[m + "shared_experts.down_proj.weight"] = (d, width)
    else:
        t[m + "gate_proj.weight"] = (cfg.intermediate_size, d)
        t[m + "up_proj.weight"] = (cfg.intermediate_size, d)
        t[m + "down_proj.weight"] = (d, cfg.intermediate_size)
    return t


def checkpoint_tensors(
    cfg: ModelConfig, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16, mtp: bool = False
) -> dict[str, TensorSpec]:
    """The checkpoint's tensor table (REFERENCE.md §7.1): name -> TensorSpec(shape, storage dtype).

    fp8=True stores every quantisable linear as e4m3 plus an fp32 `weight_scale_inv` [ceil(out/128),
    ceil(in/128)]; the rest is `dtype` (bf16 in the release), except the router bias (fp32). `mtp=True` adds
    the multi-token-prediction module stored as layer `num_hidden_layers` (the loader ignores it).
    """
    d, block = cfg.hidden_size, _block_size(cfg)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(_layer_tensors(cfg, i))
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
    if mtp:
        for j in range(cfg.num_nextn_predict_layers):
            i = cfg.num_hidden_layers + j
            moe = cfg.replace(first_k_dense_replace=0) if cfg.num_moe_layers else cfg  # the MTP block is MoE
            shapes.update(_layer_tensors(moe, i))
            p = f"model.layers.{i}."
            shapes.update({
                p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                p + "embed_tokens.weight": (cfg.vocab_size, d), p + "shared_head.norm.weight": (d,),
                p + "shared_head.head.weight": (cfg.vocab_size, d),
            })
    table: dict[str, TensorSpec] = {}
    for name, shape in shapes.items():
        if name.endswith(KEEP_FP32):
            table[name] = TensorSpec(shape, torch.float32)
        elif fp8 and is_fp8_weight(name, shape):
            table[name] = TensorSpec(shape, FP8_DTYPE)
            table[name + SCALE_SUFFIX] = TensorSpec(scale_shape(shape, block), torch.float32)
        else:
            table[name] = TensorSpec(shape, dtype)
    return table


COMPONENTS = ("embeddings + head", "attention (MLA)", "indexer", "dense FFN", "routed experts", "shared experts",
              "router", "norms", "FP8 scales")


def component_of(name: str) -> str:
    """Which part of the model a stored tensor belongs to (one of COMPONENTS), for byte breakdowns."""
    if name.endswith(SCALE_SUFFIX):
        return "FP8 scales"
    if "norm" in name.rsplit(".", 2)[-2] or name.endswith(("k_norm.bias", "enorm.weight", "hnorm.weight")):
        return "norms"
    if "embed_tokens" in name or "lm_head" in name or "shared_head.head" in name or "eh_proj" in name:
        return "embeddings + head"
    if ".indexer." in name:
        return "indexer"
    if ".self_attn." in name:
        return "attention (MLA)"
    if ".mlp.experts." in name:
        return "routed experts"
    if ".mlp.shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense FFN"
    raise ValueError(f"{name}: not a DeepSeek-V3.2 tensor name")


def bytes_by_component(table: dict[str, TensorSpec]) -> dict[str, int]:
    """Sum of stored bytes per component (COMPONENTS order) of a tensor table."""
    out = {c: 0 for c in COMPONENTS}
    for name, spec in table.items():
        out[component_of(name)] += spec.nbytes
    return out


def layer_of(name: str) -> int | None:
    """'model.layers.12.mlp.gate.weight' -> 12; None for tensors outside the decoder layers."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_mtp(name: str, cfg: ModelConfig) -> bool:
    """Tensors of the MTP module (`model.layers.61.*` in the release): stored, but not part of inference."""
    layer = layer_of(name)
    return layer is not None and layer >= cfg.num_hidden_layers


def _block_size(cfg: ModelConfig) -> int:
    q = cfg.quantization_config or {}
    size = q.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if list(size) != [size[0], size[0]]:
        raise CheckpointError(f"weight_block_size={size}: only square FP8 blocks are supported.")
    return int(size[0])


# ---------------------------------------------------------------------------------------------------------------
# FP8 blocks
# ---------------------------------------------------------------------------------------------------------------
def quantize_fp8_blocks(
    weight: torch.Tensor, block: int = FP8_BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise a 2-D weight to e4m3: one fp32 scale per `block` x `block` tile.

    scale = amax(tile) / 448 (rounded up to a power of two when scale_fmt="ue8m0"); q = W / scale in e4m3.
    Edge tiles are zero-padded to full size before their amax, so a 576-row matrix gets 5 row blocks whose
    last one covers rows 512..575 (REFERENCE.md §7.2). Returns (q [out, in] e4m3, scale_inv [ceil(out/b),
    ceil(in/b)] fp32).
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_fp8_blocks expects a 2-D weight, got shape {tuple(weight.shape)}.")
    rows, cols = weight.shape
    rb, cb = scale_shape((rows, cols), block)
    w = weight.float()
    padded = torch.zeros(rb * block, cb * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    tiles = padded.view(rb, block, cb, block)  # [row block, row, col block, col]
    amax = tiles.abs().amax(dim=(1, 3))  # [rb, cb]
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    elif scale_fmt not in (None, "float"):
        raise ValueError(f"scale_fmt={scale_fmt!r}: use None/'float' (amax/448) or 'ue8m0' (powers of two).")
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(rb * block, cb * block)[:rows, :cols].contiguous()
    return q, scale.contiguous()


def dequantize_fp8_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = FP8_BLOCK
) -> torch.Tensor:
    """W[i, j] = float(q[i, j]) * scale_inv[i // block, j // block], cropped to q's shape; returned as `dtype`.

    The product is formed in fp32 (exact: an e4m3 value times an fp32 scale), in place on one fp32 copy of the
    tiles (peak temporary: 4 bytes per weight), then cast once.
    """
    if q.dim() != 2 or scale_inv.shape != scale_shape(tuple(q.shape), block):
        raise CheckpointError(
            f"FP8 weight of shape {tuple(q.shape)} needs weight_scale_inv of shape "
            f"{scale_shape(tuple(q.shape), block)} (one scale per {block}x{block} block), got "
            f"{tuple(scale_inv.shape)}. The scale belongs to another tensor or the block size is wrong."
        )
    rows, cols = q.shape
    rb, cb = scale_inv.shape
    if rows % block == 0 and cols % block == 0:  # the common case: scale whole tiles in place, no padding
        w = q.to(torch.float32)
        w.view(rb, block, cb, block).mul_(scale_inv.float()[:, None, :, None])
    else:  # a partial edge block (kv_a_proj_with_mqa's 576 rows): pad to whole tiles, scale, crop
        w = torch.zeros(rb * block, cb * block, dtype=torch.float32, device=q.device)
        w[:rows, :cols] = q.to(torch.float32)
        w.view(rb, block, cb, block).mul_(scale_inv.float()[:, None, :, None])
        w = w[:rows, :cols]
    return w.to(dtype) if dtype != torch.float32 else w.contiguous()


class FP8Linear(torch.nn.Module):
    """A bias-free Linear whose weight stays as stored: `weight` [out, in] e4m3 and `weight_scale_inv` [ceil(out/128),
    ceil(in/128)] fp32, the checkpoint's own tensors and names. forward(x) dequantises the weight to x's dtype and
    runs F.linear, one layer at a time, so the model holds 1 byte per weight (a GPU kernel with scaled FP8 matmuls
    would fuse the two steps). How the weight is stored changes; how the layer computes does not."""

    def __init__(self, in_features: int, out_features: int, block: int = FP8_BLOCK):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        scale = scale_shape((out_features, in_features), block)
        self.weight_scale_inv = torch.nn.Parameter(torch.empty(scale, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # on a GPU: block-scaled FP8 matmul, no dequantised copy (chapter 6, loaded only here)
            from dslib.kernels import fp8
            if (y := fp8.linear_fast_path(x, self.weight, self.weight_scale_inv, self.block)) is not None:
                return y
        return torch.nn.functional.linear(x, dequantize_fp8_blocks(self.weight, self.weight_scale_inv, x.dtype, self.block))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 + {self.block}x{self.block} scales"


# Linears that stay dequantised even with FP8 storage: MLA reads kv_b_proj's weight directly (W_UK / W_UV views
# for the absorbed path), as DeepSeek's reference dequantises wkv_b once.
KEEP_DEQUANTIZED = ("kv_b_proj",)


def use_fp8_storage(model: torch.nn.Module, prefix: str = "", block: int = FP8_BLOCK) -> int:
    """Swap every nn.Linear whose weight the release stores in FP8 for an `FP8Linear` (same names, so the
    state_dict gains each `weight_scale_inv`). Returns how many were swapped. Use on a model about to be loaded."""
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{prefix}{name}.{child_name}" if name else f"{prefix}{child_name}"
            if (type(child) is torch.nn.Linear and child.bias is None and child_name not in KEEP_DEQUANTIZED
                    and is_fp8_weight(full + ".weight", tuple(child.weight.shape))):
                setattr(module, child_name, FP8Linear(child.in_features, child.out_features, block))
                swapped += 1
    return swapped


# ---------------------------------------------------------------------------------------------------------------
# Sources: where stored tensors come from
# ---------------------------------------------------------------------------------------------------------------
class TensorSource(ABC):
    """Stored tensors by name, read one group at a time (a shard of a file checkpoint, a layer of a random one).

    The loader asks for `config`, `specs()` (what is stored), `groups()` (read order) and reads each group inside
    `with source.open(group) as get:`; it may read a single tensor of another group with `read(name)` (a scale
    stored in another shard). Nothing else: a file checkpoint and a seeded random one load through the same code.
    """

    config: ModelConfig
    description: str = "tensors"

    @abstractmethod
    def specs(self) -> dict[str, TensorSpec]:
        """name -> TensorSpec of every stored tensor (read from headers; no data)."""

    @abstractmethod
    def groups(self) -> list[tuple[str, list[str]]]:
        """(group label, names in it) in read order."""

    @abstractmethod
    def open(self, group: str) -> contextlib.AbstractContextManager[Callable[[str], torch.Tensor]]:
        """Context manager giving `get(name) -> Tensor` for the tensors of one group."""

    def read(self, name: str) -> torch.Tensor:
        """One tensor from whichever group holds it."""
        for group, names in self.groups():
            if name in names:
                with self.open(group) as get:
                    return get(name)
        raise KeyError(name)

    def group_nbytes(self) -> dict[str, int]:
        specs = self.specs()
        return {g: sum(specs[n].nbytes for n in names) for g, names in self.groups()}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """Reads one .safetensors file without memory-mapping it.

    The format is 8 bytes (little-endian u64 n) + n bytes of JSON header {name: {dtype, shape, data_offsets}}
    + the raw little-endian tensor bytes. The header is validated against the file size on open (this is where a
    truncated or corrupt file is caught); `read(name)` reads exactly one tensor's bytes with `readinto`, so the
    process holds only what it asked for (file pages stay in the OS page cache, not in the process).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError(f"{size} bytes, too short for a header")
                n = int.from_bytes(head, "little")
                if n > min(size - 8, 100_000_000):
                    raise ValueError(f"header of {n} bytes does not fit a file of {size} bytes")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.data_start = 8 + n
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            covered = 0
            for name, e in header.items():
                dtype = _SAFETENSORS_DTYPES.get(e["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has dtype {e['dtype']}, which dslib cannot load")
                shape, (begin, stop) = tuple(int(x) for x in e["shape"]), e["data_offsets"]
                if stop - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                    raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {list(shape)} {e['dtype']}")
                self.entries[name] = (dtype, shape, begin, stop)
                covered = max(covered, stop)
            if self.data_start + covered != size:
                raise ValueError(f"the header describes {self.data_start + covered} bytes, the file has {size}")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"{self.path} is not a readable safetensors file ({err}). It is corrupt or truncated (an interrupted "
                "copy/download?): copy or download it again."
            ) from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def spec(self, name: str) -> TensorSpec:
        dtype, shape, _, _ = self.entries[name]
        return TensorSpec(shape, dtype)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name` in a fresh CPU buffer, or read straight into `out` (a contiguous CPU tensor of the same
        dtype and shape, e.g. the parameter it is destined for)."""
        dtype, shape, begin, stop = self.entries[name]
        if out is None or out.dtype != dtype or tuple(out.shape) != shape or out.device.type != "cpu" or not out.is_contiguous():
            out = torch.empty(shape, dtype=dtype)
        raw = out.view(-1).view(torch.uint8) if out.numel() else torch.empty(0, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(raw.numpy()))
        if got != stop - begin:
            raise CheckpointError(f"{self.path}: {name} ends early ({got} of {stop - begin} bytes): the file is truncated.")
        return out


class SafetensorsSource(TensorSource):
    """A checkpoint folder: `config.json` + `model.safetensors`, or `model.safetensors.index.json` + shards.

    Only headers are read at construction (that is where a corrupt or missing shard is reported); tensors are read
    one at a time by `open(shard)`. Files are opened read-only and never changed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"No such checkpoint folder: {self.path}. Check the path.")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file; pass the checkpoint folder (the one holding config.json).")
        self.config = ModelConfig.from_pretrained(self.path)
        self.description = str(self.path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"{index} is not a valid safetensors index ({err}); it must be JSON with a 'weight_map' "
                    "object. Restore it from the original checkpoint."
                ) from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
            weight_map = None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            raise CheckpointError(
                f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}"
                + (f" (found {found[:3]}; an index file must list them)" if found else "")
                + ". A checkpoint folder written by save_pretrained holds one of the two."
            )
        missing = [f for f in files if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard(s) listed in {INDEX_FILE} are absent from {self.path}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Copy/download the missing files."
            )
        self._files = {f: SafetensorsFile(self.path / f) for f in files}
        self._specs = {n: sf.spec(n) for sf in self._files.values() for n in sf.keys()}
        if weight_map is not None:
            for name, f in weight_map.items():
                if name not in self._files[f].entries:
                    raise CheckpointError(
                        f"{INDEX_FILE} says {name} is in {f}, but that shard does not hold it. The index and the "
                        "shards come from different checkpoints: restore both from the same one."
                    )

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def groups(self) -> list[tuple[str, list[str]]]:
        return [(f, sf.keys()) for f, sf in self._files.items()]

    @contextlib.contextmanager
    def open(self, group: str):
        yield self._files[group].read

    def file_sizes(self) -> dict[str, int]:
        return {f: (self.path / f).stat().st_size for f in self._files}


def _seed_of(seed: int, name: str) -> int:
    """A per-tensor seed: the same tensor gets the same values whatever order tensors are generated in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class RandomSource(TensorSource):
    """Seeded random tensors with the names, shapes and dtypes of a real checkpoint of `cfg` (one group per
    layer), generated on `device`: a full-size synthetic model on a GPU whose disk could never hold the files.

    Values: linear weights ~ N(0, initializer_range) (then FP8-block-quantised when fp8=True); RMSNorm and
    LayerNorm weights 1, LayerNorm bias 0; router bias ~ N(0, 0.01) so that "bias selects, weights don't" is
    exercised. Every tensor has its own seed derived from (seed, name).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0, *, fp8: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", mtp: bool = False, scale_fmt: str | None = None):
        self.config = cfg
        if fp8 and not cfg.quantization_config:
            self.config = cfg.replace(quantization_config=fp8_quantization_config(scale_fmt))
        self.seed, self.fp8, self.dtype, self.device, self.scale_fmt = seed, fp8, dtype, torch.device(device), scale_fmt
        self._specs = checkpoint_tensors(self.config, fp8=fp8, dtype=dtype, mtp=mtp)
        self.description = f"random weights (seed {seed}, {'FP8 blocks' if fp8 else str(dtype)})"
        self._last: tuple[str | None, tuple] = (None, ())

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def groups(self) -> list[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        for name in self._specs:
            layer = layer_of(name)
            groups.setdefault("embeddings+head" if layer is None else f"layer {layer}", []).append(name)
        return list(groups.items())

    @contextlib.contextmanager
    def open(self, group: str):
        yield self._make

    def _make(self, name: str) -> torch.Tensor:
        if name.endswith(SCALE_SUFFIX):  # generated together with its weight
            return self._quantized(name[: -len(SCALE_SUFFIX)])[1]
        spec = self._specs[name]
        if spec.dtype == FP8_DTYPE:
            return self._quantized(name)[0]
        if name.endswith("e_score_correction_bias"):
            return self._normal(name, spec.shape, 0.01).to(spec.dtype)
        if len(spec.shape) == 1:  # norm weights and the indexer's LayerNorm bias
            fill = 0.0 if name.endswith(".bias") else 1.0
            return torch.full(spec.shape, fill, dtype=spec.dtype, device=self.device)
        return self._normal(name, spec.shape, self.config.initializer_range).to(spec.dtype)

    def _normal(self, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(_seed_of(self.seed, name))
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32) * std

    def _quantized(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last[0] != name:  # a weight and its scale are asked for one after the other: make them once
            w = self._normal(name, self._specs[name].shape, self.config.initializer_range)
            self._last = (name, quantize_fp8_blocks(w, _block_size(self.config), self.scale_fmt))
        return self._last[1]


class StateDictSource(TensorSource):
    """An in-memory state dict (e.g. `model.state_dict()`) as one group."""

    def __init__(self, state_dict: dict[str, torch.Tensor], cfg: ModelConfig, description: str = "state dict"):
        self.config, self._sd, self.description = cfg, state_dict, description

    def specs(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self._sd.items()}

    def groups(self) -> list[tuple[str, list[str]]]:
        return [("state dict", list(self._sd))]

    @contextlib.contextmanager
    def open(self, group: str):
        yield self._sd.__getitem__


# ---------------------------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------------------------
def fp8_quantization_config(scale_fmt: str | None = None, block: int = FP8_BLOCK) -> dict:
    """The `quantization_config` entry of an FP8 checkpoint's config.json (as in the release)."""
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    if scale_fmt == "ue8m0":
        q["scale_fmt"] = "ue8m0"
    return q


def write_checkpoint(
    source: TensorSource, path: str | Path, *, fp8: bool = False, dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30, scale_fmt: str | None = None, overwrite: bool = False, progress: bool = True,
) -> Path:
    """Write `source` in the official layout: config.json + `model-0000i-of-0000n.safetensors` + index
    (or a single `model.safetensors` when everything fits one shard).

    fp8=True block-quantises every quantisable float weight (adding `weight_scale_inv`); tensors that are
    already e4m3 pass through. `dtype` casts the remaining float tensors (None keeps them). Shards are planned from
    the specs first, then filled one at a time, so peak memory is about one shard (plus what the source holds).
    Refuses to write into a folder that already holds a checkpoint unless overwrite=True.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.glob("*.safetensors")) and not overwrite:
        raise CheckpointError(
            f"{path} already holds *.safetensors files; dslib never overwrites a checkpoint. Choose an empty "
            "folder, or pass overwrite=True if you mean to replace it."
        )
    cfg = source.config
    block = _block_size(cfg)
    stored = _stored_specs(source.specs(), fp8=fp8, dtype=dtype, block=block)
    # Plan shards in source group order (a weight and its scale always share a shard).
    shards: list[list[str]] = [[]]
    size = 0
    order = [n for _, names in source.groups() for n in names if not n.endswith(SCALE_SUFFIX)]
    for name in order:
        unit = [name] + ([name + SCALE_SUFFIX] if name + SCALE_SUFFIX in stored else [])
        nbytes = sum(stored[n].nbytes for n in unit)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(path.glob("*.safetensors")) + [path / INDEX_FILE]:
            old.unlink(missing_ok=True)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    group_of = {n: g for g, names in source.groups() for n in names}
    bar = _progress(len(shards), f"writing {path.name}", progress)
    for file, names in zip(files, shards):
        tensors: dict[str, torch.Tensor] = {}
        for group in dict.fromkeys(group_of[n] for n in names if n in group_of):
            with source.open(group) as get:
                for n in names:
                    if group_of.get(n) == group:
                        tensors.update(_stored_tensors(n, get(n), stored, block, scale_fmt, dtype, get))
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(path / file),
                  metadata={"format": "pt"})
        del tensors
        bar.update(1)
    bar.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in stored.values())},
            "weight_map": {n: f for f, names in zip(files, shards) for n in names},
        }
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    has_fp8 = any(s.dtype == FP8_DTYPE for s in stored.values())
    if has_fp8 and not cfg.quantization_config:
        cfg = cfg.replace(quantization_config=fp8_quantization_config(scale_fmt, block))
    elif not has_fp8 and cfg.quantization_config:  # e.g. a model loaded from FP8 and saved dequantised
        cfg = cfg.replace(quantization_config=None)
    float_dtypes = [s.dtype for n, s in stored.items() if s.dtype.is_floating_point and s.dtype != FP8_DTYPE
                    and not n.endswith((SCALE_SUFFIX,) + KEEP_FP32)]
    if float_dtypes:
        cfg = cfg.replace(torch_dtype=str(max(set(float_dtypes), key=float_dtypes.count)).removeprefix("torch."))
    cfg.save_pretrained(path)
    return path


def _stored_specs(specs: dict[str, TensorSpec], *, fp8: bool, dtype: torch.dtype | None, block: int):
    out: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        if name.endswith(SCALE_SUFFIX):
            out[name] = spec
        elif fp8 and spec.dtype != FP8_DTYPE and spec.dtype.is_floating_point and is_fp8_weight(name, spec.shape):
            out[name] = TensorSpec(spec.shape, FP8_DTYPE)
            out[name + SCALE_SUFFIX] = TensorSpec(scale_shape(spec.shape, block), torch.float32)
        elif dtype is not None and spec.dtype.is_floating_point and spec.dtype != FP8_DTYPE and not name.endswith(KEEP_FP32):
            out[name] = TensorSpec(spec.shape, dtype)
        else:
            out[name] = spec
    return out


def _stored_tensors(name, tensor, stored, block, scale_fmt, dtype, get) -> dict[str, torch.Tensor]:
    spec = stored[name]
    if name.endswith(SCALE_SUFFIX):
        return {name: tensor}
    if spec.dtype == FP8_DTYPE and tensor.dtype != FP8_DTYPE:
        q, scale = quantize_fp8_blocks(tensor, block, scale_fmt)
        return {name: q, name + SCALE_SUFFIX: scale}
    return {name: tensor.to(spec.dtype)}


def save_pretrained(model: torch.nn.Module, path: str | Path, *, fp8: bool = False, **kwargs) -> Path:
    """Save a dslib model (its config + state_dict) in the official layout; see `write_checkpoint`."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError("save_pretrained needs a dslib model with a `config` (dslib.model.DeepseekV32ForCausalLM).")
    return write_checkpoint(StateDictSource(model.state_dict(), cfg), path, fp8=fp8, **kwargs)


def write_synthetic_checkpoint(cfg: ModelConfig, path: str | Path, *, seed: int = 0, fp8: bool = True,
                               dtype: torch.dtype = torch.bfloat16, **kwargs) -> Path:
    """A checkpoint of random weights with the official names, shapes and dtypes (any size, up to 671B)."""
    source = RandomSource(cfg, seed, fp8=fp8, dtype=dtype, scale_fmt=kwargs.get("scale_fmt"))
    return write_checkpoint(source, path, fp8=fp8, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="shard")


def check_against_model(specs: dict[str, TensorSpec], expected: dict[str, tuple[int, ...]], cfg: ModelConfig,
                        where: str) -> None:
    """Raise CheckpointError if stored tensors do not match the model: missing, unexpected, wrong shape, an FP8
    weight without its scale. MTP tensors (layers >= num_hidden_layers) are ignored."""
    stored = {n: s for n, s in specs.items() if not is_mtp(n, cfg)}
    missing = [n for n in expected if n not in stored]
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}. The checkpoint "
            "is incomplete or was written for another config: check config.json against the shards."
        )
    extra = [n for n in stored if n not in expected and not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in expected)]
    if extra:
        raise CheckpointError(
            f"{where} holds {len(extra)} tensor(s) this model has no place for, e.g. {', '.join(extra[:3])}. "
            "config.json does not describe these shards (wrong num_hidden_layers / n_routed_experts / q_lora_rank?)."
        )
    for name, shape in expected.items():
        spec = stored[name]
        if spec.shape != tuple(shape):
            raise CheckpointError(
                f"{where}: {name} has shape {list(spec.shape)} but config.json implies {list(shape)}. The config and "
                "the weights do not belong together: use the config.json that came with these shards."
            )
        if spec.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = name + SCALE_SUFFIX
            if scale not in stored:
                raise CheckpointError(
                    f"{where}: {name} is stored in FP8 ({spec.dtype}) but {scale} is missing, so it cannot be "
                    "dequantised. Every FP8 weight needs its block scales: re-export the checkpoint with them."
                )
            want = scale_shape(spec.shape, _block_size(cfg))
            if stored[scale].shape != want:
                raise CheckpointError(
                    f"{where}: {scale} has shape {list(stored[scale].shape)}, expected {list(want)} for "
                    f"{_block_size(cfg)}x{_block_size(cfg)} blocks of a {list(spec.shape)} weight."
                )


def _device_for(name: str, device: torch.device, device_map: dict[str, str] | None) -> torch.device:
    if not device_map:
        return device
    best = max((p for p in device_map if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise CheckpointError(f"device_map places no module holding {name}; add an entry for it.")
    return torch.device(device_map[best])


def _allocate(module: torch.nn.Module, prefix: str, dtype: torch.dtype, device: torch.device,
              device_map: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Give every tensor of `module.state_dict()` its final storage (empty, final dtype and device) before any
    reading: the model is allocated once, and the loader only copies into it, so temporaries never interleave
    with parameters on the heap and no parameter keeps a view of a memory-mapped shard alive."""
    slots = {}
    for name, old in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if old.dtype == FP8_DTYPE or full.endswith(SCALE_SUFFIX):  # FP8 storage: kept as stored
            target = old.dtype
        else:
            target = torch.float32 if full.endswith(KEEP_FP32) else dtype
        new = torch.empty(old.shape, dtype=target, device=_device_for(full, device, device_map))
        module_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(module_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(new, requires_grad=False)
        else:
            owner._buffers[leaf] = new
        slots[full] = new
    return slots


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device (no memory, no init) but real buffers, so computed
    non-persistent buffers (RoPE frequencies) keep their values while weights wait for the checkpoint."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _fill(module: torch.nn.Module, prefix: str, source: TensorSource, device: torch.device, dtype: torch.dtype,
          device_map: dict[str, str] | None, progress: bool) -> None:
    """Read every tensor `prefix + name` of `module.state_dict()` from `source` into `module`, one group at a time:
    copy out of the group, dequantise FP8 blocks (on the target device), cast, place. Checks names/shapes first."""
    cfg = source.config
    block = _block_size(cfg)
    expected = {prefix + n: tuple(t.shape) for n, t in module.state_dict().items()}
    specs = source.specs()
    if prefix:  # a part of the model: only its own tensors matter
        specs = {n: s for n, s in specs.items() if n.startswith(prefix)}
    check_against_model(specs, expected, cfg, source.description)
    groups = [(g, [n for n in names if n in expected]) for g, names in source.groups()]
    groups = [(g, names) for g, names in groups if names]
    where = {n: g for g, names in source.groups() for n in names}
    slots = _allocate(module, prefix, dtype, device, device_map)
    bar = _progress(len(groups), "loading", progress)
    for group, names in groups:
        with source.open(group) as get:
            for name in names:
                slot = slots[name]
                tensor = get(name, out=slot) if isinstance(source, SafetensorsSource) else get(name)
                if tensor is slot:  # read straight into place (same dtype and shape on the CPU)
                    continue
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and slot.dtype != tensor.dtype:
                    scale_name = name + SCALE_SUFFIX
                    scale = get(scale_name) if where[scale_name] == group else source.read(scale_name)
                    tensor = dequantize_fp8_blocks(tensor.to(slot.device), scale.to(slot.device), torch.float32, block)
                slot.copy_(tensor)  # casts to the slot's dtype, moves to its device
                del tensor
        bar.update(1)
    bar.close()


def load_pretrained(
    path: str | Path | TensorSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
    device_map: dict[str, str] | None = None, progress: bool = True, keep_fp8: bool = False,
) -> "torch.nn.Module":
    """Load a DeepSeek-V3.2 checkpoint folder (or any TensorSource) into `dslib.model.DeepseekV32ForCausalLM`.

    One group (shard) is read at a time: each tensor is copied out of the memory-mapped shard, FP8 weights are
    dequantised with their 128x128 `weight_scale_inv` blocks, cast to `dtype` (the router bias stays fp32),
    moved to its device and put into the module tree; then the shard is closed. MTP tensors are skipped.
    `device_map` (module prefix -> device, e.g. from `dslib.devices.plan_devices(...).device_map`) places
    layers on several devices; otherwise everything goes to `device`.
    keep_fp8=True keeps the FP8 linears as stored (`FP8Linear`: 1 byte per weight + scales, dequantised per call),
    the way the 671B model fits on 8 GPUs; it needs an FP8 checkpoint.
    """
    from dslib.model import DeepseekV32ForCausalLM

    source = path if isinstance(path, TensorSource) else SafetensorsSource(path)
    device = torch.device(device)
    with _parameters_on_meta():
        model = DeepseekV32ForCausalLM(source.config)
        if keep_fp8:
            if not any(s.dtype == FP8_DTYPE for s in source.specs().values()):
                raise CheckpointError(
                    f"keep_fp8=True keeps FP8 weights as stored, but {source.description} holds none. Load it "
                    "without keep_fp8, or write an FP8 copy first (write_checkpoint(..., fp8=True))."
                )
            use_fp8_storage(model, block=_block_size(source.config))
    _fill(model, "", source, device, dtype, device_map, progress)
    model.place(device, device_map)  # buffers (RoPE tables) follow their layer
    return model.eval()


def load_layer(path: str | Path | TensorSource, layer_idx: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, *, progress: bool = False) -> "torch.nn.Module":
    """One decoder layer (`model.layers.{layer_idx}.*`) of a checkpoint or source, read exactly as
    `load_pretrained` reads it: e.g. a full-size layer of the 671B model from a `RandomSource` on one GPU."""
    from dslib.model import DecoderLayer

    source = path if isinstance(path, TensorSource) else SafetensorsSource(path)
    if not 0 <= layer_idx < source.config.num_hidden_layers:
        raise ValueError(f"layer_idx={layer_idx} is outside 0..{source.config.num_hidden_layers - 1}.")
    with _parameters_on_meta():
        layer = DecoderLayer(source.config, layer_idx)
    _fill(layer, f"model.layers.{layer_idx}.", source, torch.device(device), dtype, None, progress)
    return layer.to(device).eval()
