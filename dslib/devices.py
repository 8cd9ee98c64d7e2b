"""Placing the model's layers on GPUs before loading anything (chapter 5).

The plan is arithmetic on the config and the checkpoint's tensor table (`dslib.checkpoint.checkpoint_tensors`):
bytes per module in the chosen storage (FP8 blocks or bf16), then a contiguous split of
[embed_tokens, layer 0, ..., layer L-1, norm, lm_head] over the devices that keeps the fullest device as light
as possible (pipeline-style placement: each device holds a run of consecutive layers). A plan that cannot fit
raises `DevicePlanError` saying how much is needed and how many such devices would do.

    plan = plan_devices(ModelConfig.deepseek_v32(), gpus=[141e9] * 8, storage="fp8")
    plan.device_map        # {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", ..., "lm_head": "cuda:7"}
    load_pretrained(path, device_map=plan.device_map)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dslib.checkpoint import checkpoint_tensors, layer_of
from dslib.config import ModelConfig

GB = 1e9


class DevicePlanError(RuntimeError):
    """The model does not fit the devices. The message says how much is needed and what would fit."""


STORAGE = {"fp8": dict(fp8=True, dtype=torch.bfloat16), "bf16": dict(fp8=False, dtype=torch.bfloat16),
           "fp32": dict(fp8=False, dtype=torch.float32)}


def module_of(name: str) -> str:
    """The placement unit of a tensor: 'model.layers.7', 'model.embed_tokens', 'model.norm' or 'lm_head'."""
    layer = layer_of(name)
    if layer is not None:
        return f"model.layers.{layer}"
    return name.rsplit(".", 1)[0]


def module_bytes(cfg: ModelConfig, storage: str = "fp8") -> dict[str, int]:
    """Weight bytes of each placement unit, in model order, for storage "fp8" (e4m3 + fp32 scales, the
    rest bf16), "bf16" or "fp32". The MTP module is not counted (inference does not use it). These are the
    checkpoint's bytes; `load_pretrained(keep_fp8=True)` holds kv_b_proj dequantised (bf16: +17 MB per layer of the
    671B model, well inside the default reserve)."""
    if storage not in STORAGE:
        raise ValueError(f"storage={storage!r}; use one of {list(STORAGE)}")
    out = {unit: 0 for unit in ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(cfg.num_hidden_layers)]
           + ["model.norm", "lm_head"]}  # model order
    for name, spec in checkpoint_tensors(cfg, **STORAGE[storage]).items():
        out[module_of(name)] += spec.nbytes
    return out


@dataclass
class DevicePlan:
    """Which device holds which module, and how full each device gets."""

    devices: list[str]
    capacity: list[int]  # bytes usable per device (after the reserve)
    reserve: list[int]  # bytes kept free per device for the cache and activations
    placement: dict[str, str]  # placement unit -> device
    unit_bytes: dict[str, int] = field(repr=False)

    @property
    def device_map(self) -> dict[str, str]:
        return dict(self.placement)

    @property
    def used(self) -> dict[str, int]:
        used = {d: 0 for d in self.devices}
        for unit, dev in self.placement.items():
            used[dev] += self.unit_bytes[unit]
        return used

    @property
    def total_bytes(self) -> int:
        return sum(self.unit_bytes.values())

    def layers_on(self, device: str) -> list[int]:
        return [int(u.split(".")[-1]) for u, d in self.placement.items()
                if d == device and u.startswith("model.layers.")]

    def rows(self) -> list[dict]:
        """One row per device: layers held, GB used, GB usable (for a table or a plot)."""
        rows = []
        for dev, cap, res in zip(self.devices, self.capacity, self.reserve):
            layers = self.layers_on(dev)
            extra = [u.split(".")[-1] for u, d in self.placement.items()
                     if d == dev and not u.startswith("model.layers.")]
            rows.append({
                "device": dev,
                "layers": f"{layers[0]}-{layers[-1]}" if layers else "-",
                "n_layers": len(layers),
                "also": ", ".join(extra),
                "weights_GB": self.used[dev] / GB,
                "usable_GB": cap / GB,
                "reserve_GB": res / GB,
            })
        return rows

    def __str__(self) -> str:
        lines = [f"{'device':<8} {'layers':<8} {'also':<24} {'weights':>10} {'usable':>10}"]
        for r in self.rows():
            lines.append(f"{r['device']:<8} {r['layers']:<8} {r['also']:<24} {r['weights_GB']:>8.2f}GB "
                         f"{r['usable_GB']:>8.2f}GB")
        return "\n".join(lines)


def _partition(sizes: list[int], capacity: list[int], limit: int) -> list[int] | None:
    """Assign consecutive units to devices in order, no device above min(limit, its capacity).
    Returns the device index of each unit, or None if they do not fit."""
    owner, dev, load = [], 0, 0
    for size in sizes:
        while dev < len(capacity) and load + size > min(limit, capacity[dev]):
            dev, load = dev + 1, 0
        if dev == len(capacity):
            return None
        owner.append(dev)
        load += size
    return owner


def plan_devices(
    cfg: ModelConfig, gpus: list[float] | None = None, *, storage: str = "fp8", reserve_fraction: float = 0.1,
    reserve_bytes: float = 0.0, names: list[str] | None = None,
) -> DevicePlan:
    """Place [embed_tokens, layers..., norm, lm_head] on devices of the given memory sizes (bytes).

    gpus: memory per device in bytes (pretend sizes work on CPU); None = the visible CUDA devices.
    Each device keeps `reserve_fraction` of its memory plus `reserve_bytes` free for the KV/indexer cache and
    activations. The split is contiguous and balanced: the fullest device is as light as possible.
    """
    if gpus is None:
        gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
        if not gpus:
            raise DevicePlanError(
                "No CUDA device is visible. Pass pretend sizes, e.g. gpus=[141e9] * 8, to plan on CPU."
            )
    names = names or [f"cuda:{i}" for i in range(len(gpus))]
    if len(names) != len(gpus):
        raise ValueError(f"{len(names)} device names for {len(gpus)} devices.")
    reserve = [int(g * reserve_fraction + reserve_bytes) for g in gpus]
    capacity = [max(int(g) - r, 0) for g, r in zip(gpus, reserve)]
    units = module_bytes(cfg, storage)
    sizes = list(units.values())
    total = sum(sizes)
    biggest_unit = max(units, key=units.get)
    if units[biggest_unit] > max(capacity):
        raise DevicePlanError(
            f"{biggest_unit} alone needs {units[biggest_unit] / GB:.2f} GB ({storage}) but the largest device offers "
            f"{max(capacity) / GB:.2f} GB after a {reserve_fraction:.0%} + {reserve_bytes / GB:.1f} GB reserve. Use "
            "devices with more memory, FP8 storage, or a smaller reserve."
        )
    if total > sum(capacity) or _partition(sizes, capacity, max(capacity)) is None:
        per = max(capacity)
        need = _count_needed(sizes, per)
        raise DevicePlanError(
            f"The model needs {total / GB:.2f} GB of {storage} weights, but the {len(gpus)} device(s) offer "
            f"{sum(capacity) / GB:.2f} GB after reserving {sum(reserve) / GB:.2f} GB for cache and activations. "
            f"Whole layers must fit on one device: use at least {need} device(s) of {max(gpus) / GB:.1f} GB"
            + (", or FP8 storage" if storage != "fp8" else "") + "."
        )
    # Balance: binary-search the smallest per-device limit that still fits (whole units, in order).
    lo, hi = max(sizes), max(capacity)
    while lo < hi:
        mid = (lo + hi) // 2
        if _partition(sizes, capacity, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    owner = _partition(sizes, capacity, lo)
    placement = {unit: names[o] for unit, o in zip(units, owner)}
    return DevicePlan(names, capacity, reserve, placement, units)


def _count_needed(sizes: list[int], per_device: int) -> int:
    """How many devices of `per_device` usable bytes hold these consecutive units (each unit must fit one)."""
    n = max(1, math.ceil(sum(sizes) / per_device))
    while _partition(sizes, [per_device] * n, per_device) is None:
        n += 1
    return n


def gpus_needed(cfg: ModelConfig, gpu_bytes: float, *, storage: str = "fp8", reserve_fraction: float = 0.1,
                reserve_bytes: float = 0.0) -> int:
    """The fewest devices of `gpu_bytes` each that hold the model's weights (same reserve as `plan_devices`)."""
    per = int(gpu_bytes) - int(gpu_bytes * reserve_fraction + reserve_bytes)
    sizes = list(module_bytes(cfg, storage).values())
    if max(sizes) > per:
        raise DevicePlanError(
            f"One module needs {max(sizes) / GB:.2f} GB ({storage}); a {gpu_bytes / GB:.1f} GB device offers "
            f"{per / GB:.2f} GB after the reserve, so no number of such devices holds the model."
        )
    return _count_needed(sizes, per)


# ---------------------------------------------------------------------------------------------------------------
# Planning a run: resident or streamed (chapter 6)
# ---------------------------------------------------------------------------------------------------------------
GiB = 2**30


def fmt_bytes(n: float) -> str:
    """1.5e9 -> '1.50 GB', 2.5e6 -> '2.50 MB' (decimal units, as the GPU makers count)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def held_module_bytes(cfg: ModelConfig, storage: str = "fp8") -> dict[str, int]:
    """Bytes each placement unit holds on the device once loaded: `module_bytes`, except that with FP8 storage
    `kv_b_proj` is held dequantised (bf16 instead of e4m3 + scales; MLA reads its weight directly)."""
    units = module_bytes(cfg, storage)
    if storage != "fp8":
        return units
    h = cfg.num_attention_heads
    rows, cols = h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank
    scales = math.ceil(rows / 128) * math.ceil(cols / 128) * 4
    extra = rows * cols * 2 - (rows * cols + scales)  # bf16 instead of e4m3 + its fp32 scales
    return {u: b + extra if u.startswith("model.layers.") else b for u, b in units.items()}


def cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """One layer's DSA cache per token: the latent (kv_lora_rank) + rope key (qk_rope_head_dim) + the indexer key
    (index_head_dim), in the model dtype: 1,408 B in bf16 at the 671B dims (the deployed FP8 layout is 656 + 132)."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim) * dtype_bytes


def activation_bytes(cfg: ModelConfig, chunk: int, keys: int, *, batch: int = 1, backend: str = "torch",
                     phase: str = "attention", dtype_bytes: int = 2) -> int:
    """Estimated peak temporary bytes of one layer's forward over `chunk` query tokens against `keys` cached keys.

    A model of the code, not a measurement (the GPU run measures the peak and the notebook compares the two):
      attention: per query token, the projections and per-head tensors (q, q_absorbed, the latent output, ...:
        ~ 2·(2d + q_lora + H·(qk + rope + 2C + v) + 2·(C + R) + 2·H_I·D_I) bytes, x 1.5 for transient copies);
        the gather-based sparse attention's 256-query working set ([256, k, C + R] latents + [256, H, k] scores);
        the indexer: torch builds [256, H_I, S] per-head logits (x2 for the ReLU) and [chunk, S] scores (+ their
        sort: values + int64 indices); a fused kernel ("triton") keeps only ~[min(chunk, 4096), S] fp32 scores.
      moe: per token, k routed copies of the hidden state, the experts' hidden activations and outputs, and
        the shared expert (~ k·(4d + 4I)·2 bytes), plus one dequantised weight (dense FFN, fp32 + bf16).
    """
    d, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    HI, DI, k = cfg.index_n_heads, cfg.index_head_dim, min(cfg.index_topk, keys)
    n = batch * chunk
    if phase == "attention":
        per_token = dtype_bytes * (2 * d + (cfg.q_lora_rank or d) + H * (cfg.qk_head_dim + R + 2 * C + cfg.v_head_dim)
                                   + 2 * (C + R) + 2 * HI * DI) + 4 * HI
        sub = batch * min(chunk, 256)
        attend = sub * k * ((C + R) * dtype_bytes + H * 10)  # gathered latents + fp32 scores, bf16 probs, mask
        if backend == "triton":
            index = batch * min(chunk, 4096) * keys * 4 + n * cfg.index_topk * 8
            attend = 0  # the kernel gathers inside, in on-chip memory
        else:
            index = sub * HI * keys * 4 * 2 + n * keys * (4 * 3 + 12)
        return int(1.5 * n * per_token) + attend + index
    if phase == "moe":
        width = cfg.moe_intermediate_size if cfg.num_moe_layers else cfg.intermediate_size
        k_e = cfg.num_experts_per_tok if cfg.num_moe_layers else 1
        per_token = dtype_bytes * (k_e * (4 * d + 4 * width) + 2 * d + 4 * width) + 16 * cfg.n_routed_experts
        dequant = cfg.intermediate_size * d * (4 + dtype_bytes)
        return int(n * per_token) + dequant
    raise ValueError(f"phase must be 'attention' or 'moe', got {phase!r}.")


def _largest_chunk(fits, tokens: int, cap: int, floor: int = 256) -> int:
    """The largest power-of-two chunk <= min(tokens, cap) for which fits(chunk) holds (at least `floor`, or all the
    tokens if fewer)."""
    c = 1 << max(0, (min(tokens, cap)).bit_length() - 1)
    if c < min(tokens, cap):
        c = min(tokens, cap) if min(tokens, cap) <= floor else c
    while c > floor and not fits(c):
        c //= 2
    return max(min(c, tokens), 1)


@dataclass
class RunPlan:
    """How a forward pass of `prompt_len` tokens runs on the devices: which layers stay resident, which stream.

    mode "resident": every layer is loaded once and stays (the 8-GPU case). mode "streaming": the layers of each
    device pass through it one at a time in layer-major order (all prompt tokens through layer i, then layer
    i + 1; the hidden state [batch, prompt_len, d] stays on the device); the first `resident` layers stay loaded.
    Prefill is chunked over query tokens: `attn_chunk` queries at a time through the attention (the layer's
    latent + indexer caches hold the earlier chunks), `moe_chunk` tokens at a time through the FFN.
    `budget[device]` is the byte budget the plan was made with (what is expected to be in use at the peak).
    """

    mode: str
    devices: list[str]
    limit: list[int]  # bytes the plan may use per device
    layer_device: dict[int, str]
    resident: list[int]
    streamed: list[int]
    prompt_len: int
    batch: int
    attn_chunk: int
    moe_chunk: int
    storage: str
    backend: str
    keep_caches: str
    budget: dict[str, dict[str, int]] = field(repr=False)
    unit_bytes: dict[str, int] = field(repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def device_map(self) -> dict[str, str]:
        """Placement of every unit (`load_pretrained(device_map=...)` style); streamed layers map to the device
        they pass through."""
        first = self.devices[0]
        last = self.layer_device[max(self.layer_device)] if self.layer_device else self.devices[-1]
        out = {"model.embed_tokens": first}
        out.update({f"model.layers.{i}": d for i, d in self.layer_device.items()})
        out.update({"model.norm": last, "lm_head": last})
        return out

    def peak_bytes(self, device: str | None = None) -> int:
        """Planned peak bytes on `device` (default: the fullest device)."""
        if device is None:
            return max(sum(b.values()) for b in self.budget.values())
        return sum(self.budget[device].values())

    def rows(self) -> list[dict]:
        rows = []
        for dev, lim in zip(self.devices, self.limit):
            res = [i for i in self.resident if self.layer_device[i] == dev]
            st = [i for i in self.streamed if self.layer_device[i] == dev]
            rows.append({"device": dev, "resident_layers": _ranges(res), "streamed_layers": _ranges(st),
                         **{f"{k}_GB": v / GB for k, v in self.budget[dev].items()},
                         "planned_GB": sum(self.budget[dev].values()) / GB, "limit_GB": lim / GB})
        return rows

    def __str__(self) -> str:
        head = (f"{self.mode}: {len(self.resident)} resident + {len(self.streamed)} streamed layers, prompt "
                f"{self.prompt_len:,} x batch {self.batch}, attention chunks of {self.attn_chunk:,} queries, "
                "FFN chunks "
                f"of {self.moe_chunk:,} tokens ({self.storage} weights, backend {self.backend})")
        lines = [head]
        for dev, lim in zip(self.devices, self.limit):
            r = next(row for row in self.rows() if row["device"] == dev)
            parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in self.budget[dev].items() if v)
            lines.append(f"  {dev}: resident {r['resident_layers'] or '-'}, streamed {r['streamed_layers'] or '-'}; "
                         f"{parts}; planned {fmt_bytes(self.peak_bytes(dev))} of {fmt_bytes(lim)}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 6] -> '0-2, 5-6'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def visible_gpu_bytes() -> list[int]:
    """Total memory of each visible CUDA device, in bytes ([] without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def plan_run(
    cfg: ModelConfig, gpus: list[float] | None = None, *, prompt_len: int, batch: int = 1, storage: str = "fp8",
    backend: str = "torch", streaming: bool | None = None, memory_limit: float | None = None,
    activation_budget: float = 20 * GiB, reserve_bytes: float = 2 * GiB, keep_caches: str = "resident",
    max_new_tokens: int = 0, names: list[str] | None = None, dtype_bytes: int = 2,
    attn_chunk: int | None = None, moe_chunk: int | None = None,
) -> RunPlan:
    """Plan a forward pass of `batch` x `prompt_len` tokens on devices of `gpus` bytes (None: the visible GPUs),
    from the config alone, before anything is loaded.

    All layers resident when they fit (weights + hidden state + activations + caches + `reserve_bytes` per
    device), otherwise layer streaming (unless streaming=False) with as many layers resident as fit. Per device
    the plan may use min(its memory, `memory_limit`). Chunk sizes are the largest powers of two whose estimated
    activations (`activation_bytes`) stay within `activation_budget` (or the given `attn_chunk` / `moe_chunk`).
    keep_caches: "resident" keeps the caches of resident layers (decode over them after the prefill); "all" keeps
    every layer's (generation through all layers). Raises `DevicePlanError` naming the bytes needed.
    """
    T = prompt_len + max_new_tokens
    if not isinstance(prompt_len, int) or prompt_len <= 0:
        raise ValueError(f"prompt_len must be a positive integer, got {prompt_len!r}.")
    if T > cfg.max_position_embeddings:
        raise ValueError(
            f"{prompt_len:,} prompt tokens + {max_new_tokens} new ones exceed max_position_embeddings="
            f"{cfg.max_position_embeddings:,}, the longest context the model has positions for. Shorten the prompt."
        )
    if keep_caches not in ("resident", "all"):
        raise ValueError(f"keep_caches must be 'resident' or 'all', got {keep_caches!r}.")
    if gpus is None:
        gpus = visible_gpu_bytes()
        if not gpus:
            raise DevicePlanError("No CUDA device is visible. Pass pretend sizes, e.g. gpus=[141e9], to plan on CPU.")
    names = names or [f"cuda:{i}" for i in range(len(gpus))]
    if len(names) != len(gpus):
        raise ValueError(f"{len(names)} device names for {len(gpus)} devices.")
    limit = [int(min(g, memory_limit) if memory_limit else g) for g in gpus]
    units = held_module_bytes(cfg, storage)
    L = cfg.num_hidden_layers
    layer_bytes = [units[f"model.layers.{i}"] for i in range(L)]
    embed, head = units["model.embed_tokens"], units["model.norm"] + units["lm_head"]
    hidden = batch * prompt_len * cfg.hidden_size * dtype_bytes
    per_layer_cache = batch * T * cache_bytes_per_token(cfg, dtype_bytes)

    def attn_fits(c):
        return activation_bytes(cfg, c, T, batch=batch, backend=backend, dtype_bytes=dtype_bytes) <= activation_budget

    def moe_fits(c):
        return activation_bytes(cfg, c, T, batch=batch, phase="moe", dtype_bytes=dtype_bytes) <= activation_budget

    notes = []
    attn_chunk = attn_chunk or _largest_chunk(attn_fits, prompt_len, 16384)
    moe_chunk = moe_chunk or _largest_chunk(moe_fits, prompt_len, 16384)
    act = max(activation_bytes(cfg, attn_chunk, T, batch=batch, backend=backend, dtype_bytes=dtype_bytes),
              activation_bytes(cfg, moe_chunk, T, batch=batch, phase="moe", dtype_bytes=dtype_bytes))
    if act > activation_budget:
        notes.append(f"even the smallest chunks need ~{fmt_bytes(act)} of activations (budget "
                     f"{fmt_bytes(activation_budget)}) with backend={backend!r}")
    G = len(gpus)
    # Contiguous, balanced split of the layers over the devices (by bytes): run r holds layers owner == r.
    owner = _balanced_owner(layer_bytes, G)

    # backend="triton": the grouped MoE kernel stacks a layer's experts into one tensor once loaded, which holds
    # that layer's experts twice for a moment (the per-expert tensors are freed as they are copied)
    stacking = max(layer_bytes) if backend == "triton" and cfg.num_moe_layers else 0

    def fixed(g):  # what device g holds besides layer weights and caches
        return (embed if g == 0 else 0) + (head if g == G - 1 else 0) + hidden + act + int(reserve_bytes) + stacking

    resident_fit = all(
        fixed(g) + sum(layer_bytes[i] + per_layer_cache for i in range(L) if owner[i] == g) <= limit[g]
        for g in range(G)
    )
    overhead = hidden + act + int(reserve_bytes) + stacking  # per device, besides its layers
    need_resident = sum(layer_bytes) + L * per_layer_cache + embed + head + G * overhead
    if streaming is True or not resident_fit:
        if streaming is False:
            fewest = _fewest_devices(layer_bytes, per_layer_cache, embed, head, overhead, max(limit))
            raise DevicePlanError(
                f"All {L} layers resident need {fmt_bytes(need_resident)} ({fmt_bytes(sum(layer_bytes))} of {storage} "
                f"weights + {fmt_bytes(embed + head)} embeddings and head + caches, hidden states and activations "
                f"for {batch} x {prompt_len:,} tokens), but the {G} device(s) offer {fmt_bytes(sum(limit))} "
                f"({', '.join(fmt_bytes(x) for x in limit)}). Use streaming=True to stream the layers through the "
                f"GPU a few at a time, or at least {fewest} device(s) of {fmt_bytes(max(limit))}."
            )
        mode = "streaming"
    else:
        mode = "resident"
    resident, streamed, budget = [], [], {}
    for g in range(G):
        mine = [i for i in range(L) if owner[i] == g]
        slot = 0 if mode == "resident" else max(layer_bytes[i] for i in mine)
        kept_cache = per_layer_cache * len(mine) if keep_caches == "all" else 0
        free = limit[g] - fixed(g) - slot - kept_cache
        if mode == "streaming" and free < 0:
            need = fixed(g) + slot + kept_cache
            raise DevicePlanError(
                f"Streaming needs at least {fmt_bytes(need)} on {names[g]}: the largest layer ({fmt_bytes(slot)} "
                f"{storage}), {'embeddings/head, ' if g in (0, G - 1) else ''}the hidden state ({fmt_bytes(hidden)} "
                "for "
                f"{batch} x {prompt_len:,} tokens), ~{fmt_bytes(act)} of activations"
                + (f", {fmt_bytes(stacking)} to stack a layer's experts for the grouped kernel" if stacking else "")
                + f" and a {fmt_bytes(reserve_bytes)} reserve"
                + (" and every layer cache" if keep_caches == "all" else "") + "; "
                f"it offers {fmt_bytes(limit[g])}. "
                "Shorten the prompt, lower activation_budget, or use a device with more memory."
            )
        held = 0
        for i in mine:
            cost = layer_bytes[i] + (per_layer_cache if keep_caches == "resident" else 0)
            if mode == "resident" or held + cost <= free:
                resident.append(i)
                held += cost
            else:
                streamed.append(i)
        n_cached = len(mine) if keep_caches == "all" else len([i for i in mine if i in resident])
        budget[names[g]] = {
            "resident_weights": sum(layer_bytes[i] for i in mine if i in resident),
            "stream_slot": slot if any(i in streamed for i in mine) else 0, "stacking": stacking,
            "embed_head": (embed if g == 0 else 0) + (head if g == G - 1 else 0),
            "caches": n_cached * per_layer_cache,
            "hidden": hidden, "activations": act, "reserve": int(reserve_bytes),
        }
    if mode == "streaming" and not resident:
        notes.append("no layer stays resident: every pass streams all layers")
    layer_device = {i: names[owner[i]] for i in range(L)}
    return RunPlan(mode, names, limit, layer_device, sorted(resident), sorted(streamed), prompt_len, batch,
                   attn_chunk, moe_chunk, storage, backend, keep_caches, budget, units, notes)


def _balanced_owner(sizes: list[int], n: int) -> list[int]:
    """Device index of each layer: consecutive runs over n devices with the largest run (in bytes) minimal."""
    if n == 1:
        return [0] * len(sizes)
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if _partition(sizes, [mid] * n, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return _partition(sizes, [lo] * n, lo)


def _fewest_devices(layer_bytes, per_layer_cache, embed, head, overhead, per_device) -> int:
    """Fewest devices of `per_device` bytes that hold every layer resident with its cache and the overheads."""
    sizes = [embed] + [b + per_layer_cache for b in layer_bytes] + [head]
    usable = per_device - overhead
    if max(sizes) > usable:
        return 10**9
    return _count_needed(sizes, usable)


# ---------------------------------------------------------------------------------------------------------------
# How serving engines spread the model (chapter 6: "when users outgrow one machine")
# ---------------------------------------------------------------------------------------------------------------
SERVING_SCHEMES = {
    "pipeline": "consecutive layers per GPU (dslib's plan_devices / plan_run)",
    "tp": "tensor parallel: every weight matrix split over the GPUs (vLLM -tp 8, SGLang --tp 8)",
    "dp_attention_ep": "data-parallel attention + expert parallel: attention replicated, routed experts split "
                       "(SGLang --tp 8 --dp 8 --enable-dp-attention, vLLM -dp 8 --enable-expert-parallel)",
}


def serving_memory(cfg: ModelConfig, n_gpus: int = 8, gpu_bytes: float = 150.75e9, *, mem_fraction: float = 0.9,
                   cache: str = "bf16", context: int = 131072) -> list[dict]:
    """Per-GPU weight bytes and cache capacity of three ways to spread the FP8 model over `n_gpus` GPUs.

    From the tensor table (`checkpoint_tensors`, FP8 blocks; each scale counts with its weight):
      pipeline          whole layers per GPU (the fullest GPU of `plan_devices`); a token's cache is spread over
                        the GPUs with the layers
      tp                every tensor split n ways; MLA has ONE latent head, so every GPU keeps the whole latent
                        cache of every token (the cache is replicated n times)
      dp_attention_ep   routed experts split n ways, everything else (attention, indexer, shared expert, dense FFN,
                        router, embeddings, head) replicated; each request's cache lives on one GPU
    The cache of a token per layer: "bf16" = the 576 bf16 latent values + the FP8 indexer key (1,152 + 132 bytes),
    "fp8" = FlashMLA's 656-byte FP8 latent + the indexer key. Each GPU may fill `mem_fraction` of its memory
    (an engine's static memory fraction); what the weights leave is cache. Returns one dict per scheme:
    weights_GB (per GPU), cache_GB (per GPU), cache_tokens (tokens of cache the machine holds), requests
    (`context`-token requests whose cache fits).
    """
    L = cfg.num_hidden_layers
    latent = cfg.kv_bytes_per_token_per_layer("mla" if cache == "bf16" else "mla_fp8")
    per_layer = latent + cfg.kv_bytes_per_token_per_layer("indexer")
    per_token = L * per_layer  # one token, every layer
    table = checkpoint_tensors(cfg, fp8=True)
    split = {"experts": 0, "rest": 0}
    for name, spec in table.items():
        split["experts" if ".mlp.experts." in name else "rest"] += spec.nbytes
    usable = gpu_bytes * mem_fraction
    rows = []
    plan = plan_devices(cfg, [gpu_bytes] * n_gpus, reserve_fraction=0.0)
    worst = max(plan.devices, key=lambda d: plan.used[d])
    layers_on = {d: len(plan.layers_on(d)) for d in plan.devices}
    # pipeline: GPU d holds the cache of its own layers for every token
    tokens = min((usable - plan.used[d]) / max(layers_on[d] * per_layer, 1) for d in plan.devices)
    rows.append({"scheme": "pipeline", "weights_GB": plan.used[worst] / GB,
                 "cache_GB": (usable - plan.used[worst]) / GB, "cache_tokens": int(tokens)})
    w_tp = (split["experts"] + split["rest"]) / n_gpus
    rows.append({"scheme": "tp", "weights_GB": w_tp / GB, "cache_GB": (usable - w_tp) / GB,
                 "cache_tokens": int((usable - w_tp) / per_token)})
    w_dp = split["experts"] / n_gpus + split["rest"]
    rows.append({"scheme": "dp_attention_ep", "weights_GB": w_dp / GB, "cache_GB": (usable - w_dp) / GB,
                 "cache_tokens": int(n_gpus * (usable - w_dp) / per_token)})
    for r in rows:
        r["requests"] = r["cache_tokens"] // context
        r["what"] = SERVING_SCHEMES[r["scheme"]]
        r["cache_bytes_per_token"] = per_token
    return rows
