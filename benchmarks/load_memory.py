"""Peak host memory of `dslib.load_pretrained` on a ~1 GB synthetic sharded FP8 checkpoint (chapter 5).

The loader reads one shard at a time, so the memory it needs beyond the loaded model should track the largest
shard, not the checkpoint. This script writes a synthetic FP8 checkpoint (random weights, official names and
layout) once per shard size, loads it in a fresh child process and records

    extra = peak RSS during loading - RSS before loading - bytes of the loaded model's tensors

next to the largest shard's size ("before" is taken after the imports, including torch's meta-device code).
For the largest shard size it also loads the same checkpoint through `safetensors.safe_open` (reader
"safe_open": the file is memory-mapped, and every page of a shard read counts in the process while the shard is
open) instead of dslib's reader (reader "dslib": plain `readinto` of one tensor at a time), which is why
dslib has its own. Writes data/load_memory.csv.

    python benchmarks/load_memory.py                      # ~1 GB, shards of 100 / 250 / 500 MB
    python benchmarks/load_memory.py --size-gb 0.05 --shard-mb 10 --out /tmp/x.csv     # a quick check
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def config_for(size_gb: float):
    """A mid-sized DeepSeek-V3.2-shaped config with enough MoE layers for ~size_gb of FP8 checkpoint."""
    from dslib.checkpoint import checkpoint_tensors
    from dslib.config import ModelConfig

    base = dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=2,
        num_nextn_predict_layers=0, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, index_n_heads=8,
        index_head_dim=64, index_topk=256, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, first_k_dense_replace=1, max_position_embeddings=4096, rope_scaling=None,
    )
    size = lambda cfg: sum(s.nbytes for s in checkpoint_tensors(cfg, fp8=True).values())  # noqa: E731
    cfg = ModelConfig(**base)
    per_layer = size(cfg.replace(num_hidden_layers=3)) - size(cfg)
    layers = max(2, round((size_gb * 1e9 - size(cfg)) / per_layer) + 2)
    return cfg.replace(num_hidden_layers=layers)


def safe_open_source(path: str):
    """The same checkpoint folder, each shard read through `safetensors.safe_open` (memory-mapped)."""
    import contextlib

    from safetensors import safe_open

    from dslib.checkpoint import SafetensorsSource

    class SafeOpenSource(SafetensorsSource):
        @contextlib.contextmanager
        def open(self, group: str):
            with safe_open(str(self.path / group), "pt") as f:
                yield lambda name, out=None: f.get_tensor(name)

    return SafeOpenSource(path)


def child(path: str, dtype: str, reader: str) -> None:
    """Runs in a fresh process: load and report memory as JSON on stdout."""
    import torch

    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401  (imports are not the loader's memory)
    import tqdm.auto  # noqa: F401

    from dslib.checkpoint import load_pretrained
    from dslib.config import ModelConfig
    from dslib.model import DeepseekV32ForCausalLM

    with torch.device("meta"):  # first use of the meta device imports ~80 MB of torch code: not the loader's
        DeepseekV32ForCausalLM(ModelConfig.tiny())
    source = safe_open_source(path) if reader == "safe_open" else path
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_pretrained(source, dtype=getattr(torch, dtype), progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"rss_before": before, "peak_rss": peak, "rss_after": rss_bytes(),
                      "model_bytes": model_bytes, "load_s": seconds}))


def _row(reader: str, m: dict, sizes: dict, dtype: str, write_s: float, cfg) -> dict:
    extra = m["peak_rss"] - m["rss_before"] - m["model_bytes"]
    largest = max(sizes.values())
    row = {
        "checkpoint_bytes": sum(sizes.values()), "n_shards": len(sizes), "largest_shard_bytes": largest,
        "load_dtype": dtype, "model_bytes": m["model_bytes"], "rss_before": m["rss_before"],
        "peak_rss": m["peak_rss"], "extra_bytes": extra, "extra_over_largest_shard": round(extra / largest, 3),
        "load_s": round(m["load_s"], 2), "write_s": round(write_s, 2), "num_hidden_layers": cfg.num_hidden_layers,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)", "torch": __import__("torch").__version__,
        "reader": reader,
    }
    print(f"{reader:9s} {len(sizes):3d} shards, largest {largest / 1e6:7.1f} MB: extra host memory "
          f"{extra / 1e6:7.1f} MB = {row['extra_over_largest_shard']:.2f} x largest shard "
          f"(model {m['model_bytes'] / 1e9:.2f} GB {dtype}, checkpoint {row['checkpoint_bytes'] / 1e9:.2f} GB, "
          f"load {m['load_s']:.1f} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--shard-mb", type=float, nargs="+", default=[100, 250, 500])
    ap.add_argument("--dtype", default="bfloat16", help="dtype the model is loaded in")
    ap.add_argument("--out", default=str(ROOT / "data" / "load_memory.csv"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--reader", default="dslib", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dtype, args.reader)

    from dslib.checkpoint import SafetensorsSource, write_synthetic_checkpoint

    cfg = config_for(args.size_gb)
    rows = []
    for shard_mb in args.shard_mb:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = write_synthetic_checkpoint(cfg, Path(tmp) / "ckpt", seed=0, fp8=True,
                                              max_shard_bytes=int(shard_mb * 1e6), progress=False)
            write_s = time.perf_counter() - t0
            sizes = SafetensorsSource(path).file_sizes()
            readers = ["dslib", "safe_open"] if shard_mb == max(args.shard_mb) else ["dslib"]
            measured = {}
            for reader in readers:
                out = subprocess.run([sys.executable, __file__, "--child", str(path), "--dtype", args.dtype,
                                      "--reader", reader], capture_output=True, text=True, check=True)
                measured[reader] = json.loads(out.stdout.strip().splitlines()[-1])
        for reader, m in measured.items():
            rows.append(_row(reader, m, sizes, args.dtype, write_s, cfg))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
