"""Model configuration and the accounting you can do from it alone (chapter 1).

`ModelConfig` uses the field names of the Hugging Face `config.json` of `deepseek_v32`, so the same object
describes the 671B model (`ModelConfig.deepseek_v32()`), the small CPU models of the notebooks, and any
checkpoint folder (`ModelConfig.from_pretrained(path)`).

Everything here is arithmetic on the config: parameter counts per component, total and active parameters,
and KV-cache bytes per token for MHA / GQA / MQA / MLA (bf16 and FP8) and the indexer keys. The numbers are
checked against DeepSeek's published figures in `tests/test_config.py` and against measured tensor bytes in the
notebooks.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v32",)

# FP8 formats used by the deployed model (REFERENCE.md §3.2, §7.2).
FP8_BLOCK = 128  # weight blocks are 128 x 128; activation / KV scales cover 128 values


class ConfigError(ValueError):
    """A config that cannot describe a working model. The message says which field and how to fix it."""


@dataclass
class ModelConfig:
    """DeepSeek-V3.2 hyper-parameters, named exactly as in the checkpoint's `config.json`.

    Defaults are the 671B model. Derived sizes (`qk_head_dim`, ...) are properties, not fields, so a config
    can never disagree with itself.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048  # width of one routed or shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1  # the MTP module stored as layer `num_hidden_layers` (ignored here)
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # nominal: MLA has no KV heads in the GQA sense
    # Multi-head latent attention (chapter 2)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Lightning indexer (chapter 3)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # Mixture of experts (chapter 4)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    ep_size: int = 1
    # Positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    # Everything else
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    model_type: str = "deepseek_v32"

    # ------------------------------------------------------------------ checks
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent field and the fix."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "intermediate_size", "index_n_heads", "index_head_dim",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}.")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs of dimensions."
            )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim}: "
                "the indexer rotates its first qk_rope_head_dim dimensions."
            )
        if not isinstance(self.index_topk, int) or self.index_topk <= 0:
            raise ConfigError(
                f"index_topk must be a positive integer (tokens kept per query), got {self.index_topk!r}."
            )
        if self.index_topk > self.max_position_embeddings:
            raise ConfigError(
                f"index_topk={self.index_topk} is larger than max_position_embeddings="
                f"{self.max_position_embeddings}: no sequence could ever be sparse. Lower index_topk."
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace={self.first_k_dense_replace} must lie in 0..num_hidden_layers="
                f"{self.num_hidden_layers}."
            )
        if self.num_moe_layers:
            self._validate_moe()
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; use 'yarn' or null.")

    def _validate_moe(self) -> None:
        for name in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer for a model with MoE layers, got {value!r}.")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}: "
                "every expert group must hold the same number of experts."
            )
        if self.topk_group > self.n_group:
            raise ConfigError(f"topk_group={self.topk_group} cannot exceed n_group={self.n_group}.")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if reachable < self.num_experts_per_tok:
            raise ConfigError(
                f"topk_group * experts per group = {self.topk_group} * {self.n_routed_experts // self.n_group} = "
                f"{reachable} < num_experts_per_tok={self.num_experts_per_tok}: the kept groups hold too few "
                "experts to choose from. Raise topk_group or lower num_experts_per_tok."
            )
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func={self.scoring_func!r}: DeepSeek-V3.2 routes with 'sigmoid'.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head in MHA mode: [nope | rope] = 128 + 64 = 192."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        first = self.first_k_dense_replace
        return layer_idx >= first and (layer_idx - first) % self.moe_layer_freq == 0

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    # ------------------------------------------------------------------ presets
    @classmethod
    def deepseek_v32(cls) -> "ModelConfig":
        """The 671B DeepSeek-V3.2 (and V3.2-Exp) model, as in its `config.json`."""
        return cls(
            quantization_config={
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
                "scale_fmt": "ue8m0",
            }
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A few-thousand-parameter model for unit tests: every feature present (dense + MoE layers,
        groups, indexer with index_topk smaller than typical test sequences), plain RoPE."""
        base = dict(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_nextn_predict_layers=0, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            index_n_heads=2, index_head_dim=16, index_topk=4,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=256,
            rope_scaling=None,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides: Any) -> "ModelConfig":
        """A CPU-sized DeepSeek-V3.2 (same structure, ~4M parameters) for the notebooks, with YaRN on."""
        base = dict(
            vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_hidden_layers=4, num_nextn_predict_layers=0, num_attention_heads=8, num_key_value_heads=8,
            q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
            index_n_heads=4, index_head_dim=32, index_topk=64,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=4096,
            rope_scaling={
                "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
            },
        )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ reading and writing config.json
    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "ModelConfig":
        """Build from a `config.json` dict. Accepts the official layout (`rope_theta` + `rope_scaling`) and
        transformers 5's (`rope_parameters`); ignores keys that only transformers uses."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; dslib builds DeepSeek-V3.2 "
                f"(model_type one of {SUPPORTED_MODEL_TYPES}). Point it at a DeepSeek-V3.2 checkpoint folder."
            )
        raw = dict(raw)
        params = raw.pop("rope_parameters", None)
        if params is not None:
            params = dict(params)
            raw.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            kind = params.pop("rope_type", params.pop("type", "default"))
            raw["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        elif raw.get("rope_scaling") is not None:
            scaling = dict(raw["rope_scaling"])
            kind = scaling.pop("rope_type", None) or scaling.pop("type", "default")
            scaling.pop("type", None)
            scaling.pop("rope_theta", None)
            raw["rope_scaling"] = None if kind == "default" else {"type": kind, **scaling}
        if "torch_dtype" not in raw and "dtype" in raw:
            raw["torch_dtype"] = raw["dtype"]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        # The MoE fields of a model without MoE layers may be absent; keep the defaults then.
        try:
            return cls(**kwargs)
        except TypeError as err:  # a field of the wrong kind
            raise ConfigError(f"{source}: {err}") from None
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `<path>/config.json` (or a path to the JSON file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"No such checkpoint folder or file: {path}. Check the path.")
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no config.json. A checkpoint folder holds config.json next to its *.safetensors files."
            )
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}). "
                "Restore the file from the original checkpoint."
            ) from None
        return cls.from_dict(raw, source=str(file))

    def to_dict(self) -> dict:
        """The `config.json` content (official layout, which transformers also reads)."""
        out = dataclasses.asdict(self)
        out["architectures"] = ["DeepseekV32ForCausalLM"]
        if out["quantization_config"] is None:
            del out["quantization_config"]
        return out

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        file = path / "config.json"
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file

    # ------------------------------------------------------------------ parameter accounting
    def param_counts(self) -> dict[str, int]:
        """Parameters of each component (one instance of each), from the shapes in REFERENCE.md §7.1."""
        d, h = self.hidden_size, self.num_attention_heads
        q_in = self.q_lora_rank if self.q_lora_rank else d
        mla = (
            (d * self.q_lora_rank + self.q_lora_rank if self.q_lora_rank else 0)  # q_a_proj + q_a_layernorm
            + q_in * h * self.qk_head_dim  # q_b_proj (q_proj when q_lora_rank is null)
            + d * (self.kv_lora_rank + self.qk_rope_head_dim)  # kv_a_proj_with_mqa
            + self.kv_lora_rank  # kv_a_layernorm
            + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
            + h * self.v_head_dim * d  # o_proj
        )
        indexer = (
            q_in * self.index_n_heads * self.index_head_dim  # wq_b
            + d * self.index_head_dim  # wk
            + 2 * self.index_head_dim  # k_norm weight + bias
            + d * self.index_n_heads  # weights_proj
        )
        expert = 3 * d * self.moe_intermediate_size
        moe = (
            (self.n_routed_experts + self.n_shared_experts) * expert
            + self.n_routed_experts * d  # gate.weight
            + self.n_routed_experts  # gate.e_score_correction_bias
        )
        return {
            "embed_tokens": self.vocab_size * d,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * d,
            "final_norm": d,
            "attention": mla,
            "indexer": indexer,
            "layer_norms": 2 * d,
            "dense_mlp": 3 * d * self.intermediate_size,
            "expert": expert,
            "router": self.n_routed_experts * d + self.n_routed_experts,
            "moe_mlp": moe,
        }

    def total_params(self, *, indexer: bool = True, mtp: bool = False) -> int:
        """All parameters. `indexer=False` gives the V3/V3.1 architecture; `mtp=True` adds every tensor of the
        MTP layer (incl. its duplicate embedding and head), which is what the checkpoint on disk holds."""
        c = self.param_counts()
        layer = c["attention"] + c["layer_norms"] + (c["indexer"] if indexer else 0)
        total = c["embed_tokens"] + c["lm_head"] + c["final_norm"] + self.num_hidden_layers * layer
        total += self.num_dense_layers * c["dense_mlp"] + self.num_moe_layers * c["moe_mlp"]
        if mtp:
            total += self.num_nextn_predict_layers * self.mtp_params()
        return total

    def mtp_params(self) -> int:
        """One MTP module: a MoE decoder layer (with indexer) + enorm, hnorm, eh_proj, embed, shared head."""
        c = self.param_counts()
        d = self.hidden_size
        layer = c["attention"] + c["indexer"] + c["layer_norms"] + c["moe_mlp"]
        return layer + 2 * d + 2 * d * d + c["embed_tokens"] + d + self.vocab_size * d

    def active_params(self, *, indexer: bool = True) -> int:
        """Parameters one token touches in a forward pass: everything except the routed experts it does not
        use (it uses `num_experts_per_tok` of them per MoE layer). The input embedding counts as one row
        being read only in the sense of a full matrix here, following DeepSeek's own convention of
        counting it (their 37B figure); see REFERENCE.md §1.2."""
        c = self.param_counts()
        unused = (self.n_routed_experts - self.num_experts_per_tok) * c["expert"]
        return self.total_params(indexer=indexer) - self.num_moe_layers * unused

    # ------------------------------------------------------------------ KV cache accounting
    def kv_bytes_per_token_per_layer(self, scheme: str, *, dtype_bytes: int = 2, kv_heads: int | None = None) -> int:
        """Bytes one token adds to one layer's cache.

        scheme: "mha" (every head keeps K (qk_head_dim) and V (v_head_dim)), "gqa" (`kv_heads` groups of
        v_head_dim-wide K and V), "mqa" (one K/V head), "mla" (latent + rope key, `dtype_bytes` each),
        "mla_fp8" (FlashMLA's 656-byte format), "indexer" (FP8 key + fp32 scale).
        """
        if scheme == "mha":
            return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * dtype_bytes
        if scheme == "gqa":
            return dense_kv_bytes_per_token_per_layer(kv_heads or 8, self.v_head_dim, dtype_bytes)
        if scheme == "mqa":
            return dense_kv_bytes_per_token_per_layer(1, self.v_head_dim, dtype_bytes)
        if scheme == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes
        if scheme == "mla_fp8":
            # 512 e4m3 latent values + one fp32 scale per 128 of them + the rope key kept in bf16
            return self.kv_lora_rank + 4 * math.ceil(self.kv_lora_rank / FP8_BLOCK) + 2 * self.qk_rope_head_dim
        if scheme == "indexer":
            return self.index_head_dim + 4 * math.ceil(self.index_head_dim / FP8_BLOCK)
        raise ValueError(f"unknown KV scheme {scheme!r}; use one of {KV_SCHEMES}")

    def kv_cache_bytes(self, scheme: str, seq_len: int, batch: int = 1, **kwargs: Any) -> int:
        """Whole-model cache for `batch` sequences of `seq_len` tokens."""
        return self.kv_bytes_per_token_per_layer(scheme, **kwargs) * self.num_hidden_layers * seq_len * batch


KV_SCHEMES = ("mha", "gqa", "mqa", "mla", "mla_fp8", "indexer")


def dense_kv_bytes_per_token_per_layer(num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """A standard (MHA/GQA/MQA) cache: one K and one V vector of `head_dim` per KV head."""
    return 2 * num_kv_heads * head_dim * dtype_bytes


# The series' one GQA baseline (chapters 1 and 2): DeepSeek-V3.2's own 61 layers and 128-wide heads, with 8 key/value
# heads instead of MLA (the same as `dslib.mla.decode_costs(..., gqa_groups=8)`): 4,096 B per token and layer in bf16.
GQA_REFERENCE = {"name": "GQA-8 (61 layers x 8 KV heads x 128)", "num_layers": 61, "num_kv_heads": 8, "head_dim": 128}

# One NVIDIA H200 (SXM), the GPU the series sizes things against (sources: docs/references.md).
# Memory: marketed as "141 GB"; the GPU reports 143,771 MiB = 150.75e9 bytes
# (`torch.cuda.get_device_properties(0).total_memory` on the project's H200s). The series uses the reported number.
H200_MEMORY_BYTES = 143_771 * 2**20
H200_MEMORY_MARKETED = "141 GB"
H200_HBM_BYTES_PER_S = 4.8e12  # datasheet HBM3e bandwidth
H200_BF16_FLOPS = 989.4e12  # datasheet dense BF16 tensor-core peak (the 1,979 figure assumes 2:4 sparsity)
H200_FP8_FLOPS = 1978.9e12  # datasheet dense FP8 tensor-core peak
