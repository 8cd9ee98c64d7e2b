"""The full-size DeepSeek-V3.2 (61 layers, synthetic FP8 weights) on the GPU(s) of this machine (chapter 6).

One command, sections in order, each in try/except; results flushed as they are made (so a crash or a kill
keeps what was measured):

  1. plan      dslib.devices.plan_run for the 671B config, this machine's GPUs and the prompt length
  2. weights   SyntheticFP8Source (e4m3 codes + power-of-two scales made on the GPU) vs RandomSource + FP8
               quantisation, one MoE layer each; checks: finite, scales powers of two, std as intended
  3. prefill   a random prompt of --prompt-len tokens (default 131,072) through all 61 layers, streamed by the
               plan, with DSA and a SummaryRecorder: end-to-end seconds (weight generation included), per-layer
               split (weights / indexer / attention / FFN), peak GPU memory vs the plan
  4. decode    one token at a time over the resident layers with their prefill caches, batch 1 and 32 (CUDA
               graphs when they capture), and the extrapolation to 61 resident layers on 8 GPUs
  5. checkpoint a full-width synthetic checkpoint in the official layout (as many layers as the disk allows,
               minus headroom) + a tokenizer.json trained by `tokenizers`: written, checksummed, loaded through
               StreamedModel like a real checkpoint (tokenize, prefill, generate, token text), compared bit for
               bit with the source, checksummed again; then deleted
  6. a short table

Writes into --out: results.json (everything), recording.json.gz (the views' data; copy it to
data/full_model_recording.json.gz), full_model_layers.csv (per-layer times), full_model_decode.csv.
Imports no plotly (the GPU image has none): dslib.viz stays out of the import path.

    python benchmarks/gpu_full_model.py --out /tmp/full              # one H200: ~5-8 minutes
    python benchmarks/gpu_full_model.py --out /tmp/full --quick      # smoke run, <= 2 minutes
    python benchmarks/gpu_full_model.py --out data --standin         # CPU: a small stand-in recording (labelled)
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before torch: less fragmentation

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dslib  # noqa: E402
from dslib.checkpoint import RandomSource, load_layer  # noqa: E402
from dslib.config import ModelConfig  # noqa: E402
from dslib.devices import GiB, cache_bytes_per_token, plan_run  # noqa: E402
from dslib.record import save_recording  # noqa: E402
from dslib.streaming import StreamedModel, encode_prompt, load_tokenizer, recorded_prefill  # noqa: E402
from dslib.synthetic import SyntheticFP8Source, file_checksums, train_test_tokenizer, write_synthetic_fp8_checkpoint  # noqa: E402

GB = 1e9
PEAK_GOAL = 130 * GiB


# --------------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def standin_config() -> ModelConfig:
    """DeepSeek-V3.2's structure (61 layers, 3 dense, 256 experts in 8 groups, top-8 from 4 groups) at a width a
    CPU runs in a minute: the stand-in recording has the same views, with made-up sizes."""
    return ModelConfig.small(
        num_hidden_layers=61, first_k_dense_replace=3, hidden_size=64, intermediate_size=128, moe_intermediate_size=16,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, index_n_heads=8, index_head_dim=32, index_topk=64, vocab_size=512,
        n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8, max_position_embeddings=8192,
    )


class Run:
    """Results, flushed to results.json after every change."""

    def __init__(self, out: Path, deadline: float):
        self.out, self.deadline, self.t0 = out, deadline, time.perf_counter()
        self.results: dict = {"sections": {}}
        self.table: list[tuple[str, str, str]] = []
        self.recording: dict | None = None
        self.last_error: Exception | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def put(self, section: str, **values) -> None:
        self.results["sections"].setdefault(section, {}).update(values)
        self.flush()

    def row(self, what: str, value: str, goal: str = "") -> None:
        self.table.append((what, value, goal))
        print(f"  {what}: {value}" + (f"   (goal {goal})" if goal else ""), flush=True)

    def flush(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def section(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} ({self.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn(self, *args, **kwargs)
            self.put(name, status="ok", seconds=round(time.perf_counter() - t0, 2))
            return value
        except Exception as err:  # keep going: the other sections still run
            traceback.print_exc()
            self.last_error = err
            self.put(name, status="failed", error=f"{type(err).__name__}: {err}",
                     seconds=round(time.perf_counter() - t0, 2))
            self.row(name, f"FAILED: {type(err).__name__}: {str(err)[:120]}")
            return None


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def peak(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / GiB, 2),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved(device) / GiB, 2)}


# --------------------------------------------------------------------------------------------- sections
def section_plan(run: Run, cfg, args, device):
    gpus = None if device.type == "cuda" else [args.cpu_bytes]
    names = None if device.type == "cuda" else ["cpu"]
    if args.standin:  # a pretend device on which the stand-in streams like the 671B model on one H200 (~10 resident)
        from dslib.devices import held_module_bytes

        kw = dict(prompt_len=args.prompt_len, names=names, dtype_bytes=4, reserve_bytes=0)
        everything = plan_run(cfg, [1e15], **kw)
        moe = held_module_bytes(cfg)[f"model.layers.{cfg.num_hidden_layers - 1}"]
        gpus = [everything.peak_bytes() - max(0, cfg.num_hidden_layers - 11) * moe]
    limit = PEAK_GOAL - 2 * GiB if device.type == "cuda" else None  # room for what torch does not count
    plan = plan_run(cfg, gpus, prompt_len=args.prompt_len, backend=args.backend, memory_limit=limit, names=names,
                    dtype_bytes=torch.empty((), dtype=args.dtype).element_size(),
                    activation_budget=args.activation_gib * GiB, reserve_bytes=2 * GiB if device.type == "cuda" else 0)
    print(plan, flush=True)
    run.put("plan", mode=plan.mode, resident=plan.resident, streamed=plan.streamed, attn_chunk=plan.attn_chunk,
            moe_chunk=plan.moe_chunk, planned_peak_GiB=round(plan.peak_bytes() / GiB, 2), rows=plan.rows(),
            notes=plan.notes)
    run.row("plan", f"{plan.mode}: {len(plan.resident)} resident + {len(plan.streamed)} streamed layers, "
            f"planned peak {plan.peak_bytes() / GiB:.1f} GiB")
    return plan


def section_weights(run: Run, cfg, args, device):
    layer_idx = cfg.first_k_dense_replace  # the first MoE layer
    src = SyntheticFP8Source(cfg, args.seed, device=device)
    times = []
    for _ in range(2):  # the first includes warm-up
        sync(device)
        t0 = time.perf_counter()
        layer = load_layer(src, layer_idx, device, args.dtype, keep_fp8=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    # dequantised std over many FP8 matrices (one small matrix has a single 128 x 128 block, so a single scale)
    fp8 = [m for m in layer.modules() if hasattr(m, "weight_scale_inv")][:64]
    sq = n = 0.0
    pow2 = True
    for m in fp8:
        scale = m.weight_scale_inv.float()
        pow2 &= bool(torch.equal(torch.exp2(torch.log2(scale).round()), scale))
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: m.weight.shape[0], : m.weight.shape[1]]
        sq += float(((m.weight.float() * full) ** 2).sum())
        n += m.weight.numel()
    std = math.sqrt(sq / n)
    finite = all(bool(torch.isfinite(t.float()).all()) for t in layer.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    del layer, fp8
    assert pow2 and finite, f"synthetic weights: scales powers of two {pow2}, finite {finite}"
    assert abs(std / src.weight_std() - 1) < 0.1, f"weight std {std:.4g}, intended {src.weight_std():.4g}"
    old = None
    if not args.quick:
        sync(device)
        t0 = time.perf_counter()
        old_source = RandomSource(cfg, args.seed, fp8=True, device=device)
        ref = load_layer(old_source, layer_idx, device, args.dtype, keep_fp8=True)
        sync(device)
        old = time.perf_counter() - t0
        del ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run.put("weights", synthetic_s=round(times[-1], 3), synthetic_first_s=round(times[0], 3),
            randomsource_quantise_s=None if old is None else round(old, 3), layer_GB=round(nbytes / GB, 3),
            weight_std=std, intended_std=src.weight_std(), scales_pow2=pow2, seed=args.seed)
    run.row("weights per MoE layer", f"{times[-1]:.3f} s synthetic FP8 ({nbytes / GB:.2f} GB)"
            + (f" vs {old:.2f} s RandomSource + quantise" if old else ""))


def section_prefill(run: Run, cfg, args, device, plan):
    T = args.prompt_len
    src = SyntheticFP8Source(cfg, args.seed, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    t_start = time.perf_counter()
    model = StreamedModel(src, plan, dtype=args.dtype, backend=args.backend, precision=args.precision)
    t_resident = model.load_resident()
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(args.seed))
    meta = dict(machine=machine_name(device), torch=torch.__version__, dslib=dslib.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                weights=f"synthetic weights, seed {args.seed}", prompt=f"{T:,} random token ids, seed {args.seed}",
                backend=args.backend, precision=args.precision, stand_in=args.standin, command=" ".join(sys.argv),
                label=("STAND-IN: a small CPU run of the same code, not the H200 recording" if args.standin else
                       f"{machine_name(device)}, synthetic weights, seed {args.seed}"))
    layers_done: list[dict] = []

    def on_layer(t, rec):
        layers_done.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in t.as_dict().items()})
        where = "resident" if t.resident else "streamed"
        print(f"  layer {t.layer:2d} {t.kind:5s} {where}: weights {t.load_s:6.3f} s, "
              f"attention {t.attention_s:6.3f} s" + (f" (indexer + top-k {t.indexer_s:6.3f})" if t.indexer_s else "")
              + f", FFN {t.ffn_s:6.3f} s", flush=True)
        if t.layer % 5 == 4:  # a partial recording survives a crash
            save_recording(rec.to_dict(**meta, timings=layers_done, complete=False, overlap=False),
                           run.out / "recording.json.gz")
            write_csv(run.out / "full_model_layers.csv", layers_done)
        if run.left() < args.reserve_s:  # keep time for decode and the checkpoint
            raise TimeoutError(f"time budget spent after layer {t.layer} (the partial recording is kept)")

    cache = model.new_cache(keep="resident", max_len=T + args.decode_steps + 8)
    logits, recording, _ = recorded_prefill(model, ids, cache=cache, on_layer=on_layer, **meta)
    total = time.perf_counter() - t_start  # + loading the resident layers before the pass
    recording["result"].update(wall_s=total)  # + making the embeddings and head
    save_recording(recording, run.out / "recording.json.gz")
    write_csv(run.out / "full_model_layers.csv", layers_done)
    res = recording["result"]
    split = {key: round(res[key], 2) for key in ("load_s", "attention_s", "indexer_s", "ffn_s")}
    mem = {k: round(res[k], 2) for k in ("peak_allocated_GiB", "peak_reserved_GiB") if k in res}
    run.put("prefill", tokens=T, layers=res["layers"], end_to_end_s=round(total, 2),
            prefill_s=round(res["end_to_end_s"], 2), resident_load_s=round(t_resident, 2), split_s=split,
            logits_finite=bool(torch.isfinite(logits).all()), **mem, planned_peak_GiB=round(plan.peak_bytes() / GiB, 2))
    run.row(f"prefill {T:,} tokens x {res['layers']} layers",
            f"{total:.1f} s end to end (weights {split['load_s']:.1f}, attention {split['attention_s']:.1f} of which "
            f"indexer + top-k {split['indexer_s']:.1f}, FFN {split['ffn_s']:.1f})", "<= 120 s")
    if mem:
        run.row("peak GPU memory", f"{mem['peak_reserved_GiB']:.1f} GiB reserved, {mem['peak_allocated_GiB']:.1f} "
                f"allocated (plan {plan.peak_bytes() / GiB:.1f})", "<= 130 GiB")
    run.recording = recording
    return model, cache


def decode_time(model, layers, cache, batch, steps, device, *, graphs: bool):
    """Median ms of one decode step (embed -> `layers` -> norm + head) at `batch`, and per-layer means."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(batch)
    first, last = model.device_of[layers[0]], model.device_of[layers[-1]]

    def step(ids, start, timings=None):
        x = model.embed_tokens(ids.to(first))
        x = model.forward_layers(x, start, cache, layers, check=False, timings=timings)
        return model.lm_head(model.norm(x.to(last)))

    start = len(cache)
    times, per_layer = [], {}
    for s in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
        timings = [] if s == steps - 1 else None
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            step(ids, start + s, timings)
        sync(device)
        times.append(time.perf_counter() - t0)
        for t in timings or []:
            per_layer[t.layer] = (t.attention_s + t.ffn_s) * 1e3
    out = {"batch": batch, "layers": len(layers), "step_ms": statistics.median(times[1:] or times) * 1e3,
           "per_layer_ms": per_layer, "context": start}
    if graphs and device.type == "cuda":
        try:
            ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g).to(first)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                step(ids, len(cache))  # warm-up on the side stream, as graph capture wants
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()  # replays re-run the step at the same position (a timing, not a decode)
            with torch.cuda.graph(graph), torch.no_grad():
                step(ids, len(cache))
            graph.replay()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(10):
                graph.replay()
            sync(device)
            out["graph_step_ms"] = (time.perf_counter() - t0) / 10 * 1e3
        except Exception as err:  # the eager path syncs (input checks, MoE dispatch): capture may refuse it
            out["graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return out


def batched_cache(cache, layers, batch, max_len):
    """Caches of `layers` for `batch` sequences: copies of the batch-1 prefill cache (same context)."""
    from dslib.streaming import StreamCache

    big = StreamCache([], max_len)
    for i in layers:
        src = cache[i]
        c = type(src)(max_len, i)
        c.append(*(t.expand(batch, -1, -1).contiguous() for t in (src.kv_latent, src.k_rope, src.index_keys)))
        big.layers[i] = c
    return big


def section_decode(run: Run, cfg, args, device, model, cache):
    plan = model.plan
    resident = [i for i in plan.resident if i in cache]
    if not resident:
        raise RuntimeError("no resident layer: nothing to decode over")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    r1 = decode_time(model, resident, cache, 1, args.decode_steps, device, graphs=True)
    rows.append(r1)
    # batch 32: as many resident layers as the free memory holds 32 copies of the cache for
    dtype_bytes = torch.empty((), dtype=args.dtype).element_size()
    per_layer = 32 * (len(cache) + args.decode_steps + 8) * cache_bytes_per_token(cfg, dtype_bytes)
    free = torch.cuda.mem_get_info(device)[0] - 6 * GiB if device.type == "cuda" else 8 * GiB
    n = max(0, min(len(resident), int(free // per_layer)))
    dense = [i for i in resident if not cfg.is_moe_layer(i)][:1]
    moe = [i for i in resident if cfg.is_moe_layer(i)]
    subset = sorted(dense + moe[: max(0, n - len(dense))])[:n]
    r32 = None
    if subset:
        big = batched_cache(cache, subset, 32, len(cache) + args.decode_steps + 8)
        r32 = decode_time(model, subset, big, 32, args.decode_steps, device, graphs=True)
        rows.append(r32)
        del big
    # Extrapolation: a token passes the 61 layers one after another on 8 GPUs too (pipeline placement), so the
    # latency is the sum of per-layer times (dense x 3 + MoE x 58, measured at this context) + 7 GPU-to-GPU hops.
    extrap = {}
    for r in rows:
        lat = r["per_layer_ms"]
        d = [v for i, v in lat.items() if not cfg.is_moe_layer(i)]
        m = [v for i, v in lat.items() if cfg.is_moe_layer(i)]
        if not m:
            continue
        t_d, t_m = (statistics.mean(d) if d else statistics.mean(m)), statistics.mean(m)
        hop_ms = 0.02 + r["batch"] * cfg.hidden_size * 2 / 450e9 * 1e3  # ~20 us latency + bytes at NVLink rate
        head_ms = max(0.0, r["step_ms"] - sum(lat.values()))  # embed + norm + head + launch gaps, measured
        ms = cfg.first_k_dense_replace * t_d + cfg.num_moe_layers * t_m + head_ms + 7 * hop_ms
        extrap[r["batch"]] = {"ms_per_step": ms, "tokens_per_s": r["batch"] / ms * 1e3,
                              "pipelined_tokens_per_s_upper": 8 * r["batch"] / ms * 1e3,
                              "dense_layer_ms": t_d, "moe_layer_ms": t_m, "head_ms": head_ms, "hop_ms": hop_ms}
    method = ("61-layer step = 3 x (mean dense-layer ms) + 58 x (mean MoE-layer ms), per-layer times measured over "
              "the resident layers at this context with CUDA events, + the measured embed/norm/head time + 7 "
              "GPU-to-GPU hops (20 us + batch x 7168 x 2 B at 450 GB/s): with the layers split over 8 GPUs (pipeline "
              "placement) a token still passes them one after another; 8 micro-batches in flight give at most 8x the "
              "tokens/s.")
    run.put("decode", rows=rows, extrapolation=extrap, method=method)
    if getattr(run, "recording", None) is not None:  # the notebook shows decode next to the views
        run.recording["decode"] = {"rows": rows, "extrapolation": extrap, "method": method}
        save_recording(run.recording, run.out / "recording.json.gz")
    write_csv(run.out / "full_model_decode.csv", [{k: v for k, v in r.items() if k != "per_layer_ms"} for r in rows])
    for r in rows:
        g = f", CUDA graph {r['graph_step_ms']:.2f} ms" if "graph_step_ms" in r else (
            " (no CUDA graph)" if "graph_error" in r else "")
        run.row(f"decode batch {r['batch']}, {r['layers']} resident layers, {r['context']:,} cached",
                f"{r['step_ms']:.2f} ms per step{g}")
    for b, e in extrap.items():
        run.row(f"extrapolated: 61 layers on 8 GPUs, batch {b}", f"{e['ms_per_step']:.1f} ms per token step, "
                f"{e['tokens_per_s']:.0f} tokens/s (pipelined <= {e['pipelined_tokens_per_s_upper']:.0f})")


def section_checkpoint(run: Run, cfg_full, args, device):
    scratch = Path(tempfile.mkdtemp(prefix="dslib_ckpt_", dir=args.scratch))
    try:
        free = shutil.disk_usage(scratch).free
        full_src = SyntheticFP8Source(cfg_full)
        specs = full_src.specs()
        layer = {g: sum(specs[n].nbytes for n in names) for g, names in full_src.groups()}  # stored bytes per group
        dense_b, moe_b = layer["layer 0"], layer[f"layer {cfg_full.first_k_dense_replace}"]
        base = layer["embeddings+head"]
        headroom = max(12 * GB, 0.15 * free)
        if args.standin or device.type != "cuda":
            cfg = standin_config().replace(num_hidden_layers=4, n_routed_experts=16, n_group=4, topk_group=2,
                                           num_experts_per_tok=4, first_k_dense_replace=1)
        else:
            n_dense = 1 if args.quick else cfg_full.first_k_dense_replace
            n_moe = int((free - headroom - base - n_dense * dense_b) // moe_b)
            n_moe = max(0, min(n_moe, 1 if args.quick else args.ckpt_moe_layers))
            if n_moe == 0:
                raise RuntimeError(f"{free / GB:.0f} GB free on {scratch}: not enough for one full-width MoE layer "
                                   f"({moe_b / GB:.1f} GB) + {headroom / GB:.0f} GB headroom")
            cfg = cfg_full.replace(num_hidden_layers=n_dense + n_moe, first_k_dense_replace=n_dense)
        path = scratch / "DeepSeek-V3.2-synthetic"
        t0 = time.perf_counter()
        write_synthetic_fp8_checkpoint(cfg, path, seed=args.seed, device=device, progress=False)
        texts = [p.read_text() for p in sorted(ROOT.glob("*.md")) + sorted((ROOT / "notebooks" / "build").glob("*.py"))]
        train_test_tokenizer(path, texts, vocab_size=min(4000, cfg.vocab_size))
        t_write = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.iterdir())
        t0 = time.perf_counter()
        before = file_checksums(path)
        t_hash = time.perf_counter() - t0
        # the real-checkpoint path: tokenizer -> ids -> plan -> StreamedModel(folder) -> prefill, generate -> text
        t0 = time.perf_counter()
        tok = load_tokenizer(path)
        from dslib.checkpoint import SafetensorsSource

        source = SafetensorsSource(path)
        text = ("DeepSeek Sparse Attention selects the tokens that matter: the lightning indexer scores every "
                "earlier token.")
        ids = encode_prompt(tok, text, source.config)
        gpus = None if device.type == "cuda" else [8 * GB]
        names = None if device.type == "cuda" else ["cpu"]
        plan = plan_run(source.config, gpus, prompt_len=ids.shape[1], max_new_tokens=4, keep_caches="all", names=names,
                        dtype_bytes=torch.empty((), dtype=args.dtype).element_size())
        model = StreamedModel(source, plan, dtype=args.dtype, backend=args.backend, precision=args.precision)
        out = model.generate(ids, 4)
        logits_file = model.prefill(ids)
        t_load_run = time.perf_counter() - t0
        new_text = tok.decode(out[0, ids.shape[1]:].tolist())
        del model
        # the same weights straight from the source: every stored tensor bit for bit, then the logits
        same = SyntheticFP8Source(cfg, args.seed, device=device)
        weights_equal = True
        for i in range(cfg.num_hidden_layers):
            a = load_layer(source, i, device, args.dtype, keep_fp8=True).state_dict()
            b = load_layer(same, i, device, args.dtype, keep_fp8=True).state_dict()
            weights_equal &= a.keys() == b.keys() and all(  # bytes, not values: FP8 has no CPU equal in torch 2.4
                torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
            del a, b
        direct = StreamedModel(same, plan, dtype=args.dtype, backend=args.backend, precision=args.precision)
        logits_direct = direct.prefill(ids)
        del direct
        diff = float((logits_file - logits_direct).abs().max())
        scale = float(logits_direct.abs().max())
        # CUDA's index_add_ (the MoE scatter) adds in a varying order: allow a few bf16 ulps of the logits
        close = diff <= 1e-2 * max(scale, 1.0)
        after = file_checksums(path)
        unchanged = before == after
        run.put("checkpoint", layers=cfg.num_hidden_layers, moe_layers=cfg.num_moe_layers, bytes=size,
                files=len(before), write_s=round(t_write, 1), hash_s=round(t_hash, 1),
                load_and_run_s=round(t_load_run, 1),
                prompt_tokens=ids.shape[1], generated=out[0, ids.shape[1]:].tolist(), generated_text=new_text,
                weights_equal_to_source=weights_equal, logits_max_diff=diff, logits_close=close,
                checksums_unchanged=unchanged, sha256=before)
        width = "full-width" if cfg.hidden_size == ModelConfig.deepseek_v32().hidden_size else "small"
        run.row(f"checkpoint: {cfg.num_hidden_layers} {width} layers ({size / GB:.1f} GB, {len(before)} files)",
                f"written {t_write:.0f} s, loaded + 4 tokens {t_load_run:.0f} s; weights == source {weights_equal}, "
                f"logits max diff {diff:.2g}; checksums unchanged {unchanged}")
        assert weights_equal and close and unchanged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, recording.json.gz and the CSVs")
    ap.add_argument("--quick", action="store_true", help="smoke run (<= 2 min): 8K prompt, small checkpoint")
    ap.add_argument("--standin", action="store_true", help="CPU: the stand-in recording (small config, same code)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 131072 (16384 without the Triton kernels)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp8"],
                    help="the indexer's arithmetic; auto: fp8 with the Triton kernels (as deployed), else fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel-tuning", default=None,
                    help="a gpu_kernels_best.json (benchmarks/gpu_kernels.py) whose tiles and variants the kernels use")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget in seconds")
    ap.add_argument("--reserve-s", type=float, default=None,
                    help="seconds kept for decode and the checkpoint (default 150; 60 with --quick)")
    ap.add_argument("--decode-steps", type=int, default=12)
    ap.add_argument("--ckpt-moe-layers", type=int, default=2, help="full-width MoE layers in the checkpoint test")
    ap.add_argument("--activation-gib", type=float, default=20.0)
    ap.add_argument("--scratch", default=None, help="folder for the temporary checkpoint (default: the system temp)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: weights,prefill,decode,checkpoint")
    ap.add_argument("--cpu-bytes", type=float, default=4e9, help=argparse.SUPPRESS)
    ap.add_argument("--standin-layers", type=int, default=None, help=argparse.SUPPRESS)  # tests: fewer layers
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.standin else "cpu")
    if args.backend == "auto":
        try:
            from dslib import kernels

            args.backend = "triton" if device.type == "cuda" and kernels.available() else "torch"
        except ImportError:
            args.backend = "torch"
    if args.precision == "auto":
        args.precision = "fp8" if args.backend == "triton" else "fp32"
    tuning = {}
    if args.kernel_tuning and Path(args.kernel_tuning).is_file() and args.backend == "triton":
        from dslib import kernels

        tuning = kernels.use_tuning(args.kernel_tuning)
        print(f"kernel tuning from {args.kernel_tuning}: {sorted(tuning)}", flush=True)
    if args.standin:
        cfg, args.dtype = standin_config(), torch.float32
        if args.standin_layers:
            cfg = cfg.replace(num_hidden_layers=args.standin_layers)
        args.prompt_len = args.prompt_len or 2048
        torch.set_num_threads(1)  # small matmuls: one thread is steadiest on a shared CPU
    else:
        cfg, args.dtype = ModelConfig.deepseek_v32(), torch.bfloat16
        default = 8192 if args.quick else (131072 if args.backend == "triton" else 16384)
        args.prompt_len = args.prompt_len or default
    if args.quick:
        args.decode_steps = min(args.decode_steps, 6)
    if args.reserve_s is None:
        args.reserve_s = 60.0 if args.quick or args.standin else 150.0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the torch indexer's fp32 matmuls (the deployed one is FP8)
    run = Run(out, time.perf_counter() + args.budget_s)
    run.results.update(machine=machine_name(device), torch=torch.__version__, python=platform.python_version(),
                       triton=_version("triton"), backend=args.backend, precision=args.precision,
                       kernel_tuning=tuning,
                       prompt_len=args.prompt_len, seed=args.seed,
                       quick=args.quick, standin=args.standin, argv=sys.argv[1:],
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"{run.results['machine']} | torch {torch.__version__} | backend {args.backend} | prompt {args.prompt_len:,} "
          f"tokens | seed {args.seed}", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    plan = run.section("plan", section_plan, cfg, args, device)
    if "weights" not in skip:
        run.section("weights", section_weights, cfg, args, device)
    state = None
    if plan is not None and "prefill" not in skip:
        # If the fast path fails (a kernel error, or more memory than the plan's estimate), try smaller chunks, then
        # the PyTorch path at a length it can do in the time left; each attempt is reported.
        attempts = [(args.backend, args.prompt_len, args.activation_gib)]
        if args.backend == "triton" and not args.standin:
            attempts += [("triton", args.prompt_len, args.activation_gib / 2.5),
                         ("torch", min(args.prompt_len, 16384), 20.0)]
        tried = []
        for backend, T, act in attempts:
            if tried:
                if isinstance(run.last_error, TimeoutError) or run.left() < args.reserve_s + 90:
                    break
                args.backend, args.prompt_len, args.activation_gib = backend, T, act
                args.precision = "fp8" if backend == "triton" else "fp32"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                plan = run.section("plan", section_plan, cfg, args, device)
                if plan is None:
                    break
            run.last_error = None
            state = run.section("prefill", section_prefill, cfg, args, device, plan)
            tried.append({"backend": backend, "prompt_len": T, "activation_GiB": act,
                          "error": None if state is not None else f"{type(run.last_error).__name__}: {run.last_error}"})
            run.results["prefill_attempts"] = tried
            run.flush()
            if state is not None:
                break
    if state is not None and "decode" not in skip:
        run.section("decode", section_decode, cfg, args, device, *state)
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "checkpoint" not in skip:
        run.section("checkpoint", section_checkpoint, cfg, args, device)
    run.flush()
    print(f"\n{'what':<58} {'result':<70} goal")
    for what, value, goal in run.table:
        print(f"{what:<58} {value:<70} {goal}")
    print(f"done in {time.perf_counter() - run.t0:.0f} s; results in {out}", flush=True)


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    main()
