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
