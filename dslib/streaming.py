"""The full-size model on the GPUs a machine has: resident layers, or layers streamed through (chapter 6).

`dslib.devices.plan_run` decides from the config and the devices' memory, before anything is loaded, whether all
61 layers stay resident (8 H200s in FP8) or stream: then the layers pass through each GPU one at a time in
**layer-major order** — all prompt tokens through layer i, then layer i + 1 — while the hidden state
`[batch, T, d]` stays on the GPU and as many layers as fit stay resident. Per layer:

    for each chunk of `attn_chunk` queries:   x[chunk] += self_attn(input_layernorm(x[chunk]))
                                               (the layer's latent + indexer caches hold the earlier chunks, so
                                                each query still sees every earlier token)
    for each chunk of `moe_chunk` tokens:     x[chunk] += mlp(post_attention_layernorm(x[chunk]))

which is exactly `DecoderLayer.forward` (tested), in pieces small enough for a 128K-token prompt. Weights come
from a checkpoint folder or a `TensorSource` (e.g. `dslib.synthetic.SyntheticFP8Source`, generated on the GPU),
read by the same loader as `load_pretrained`; a streamed layer is freed after its pass. A file source is read
one layer ahead in a background thread while the GPU computes.

    plan = plan_run(cfg, prompt_len=T)                      # dslib.devices
    model = StreamedModel(source_or_path, plan, backend="triton")
    logits = model.prefill(ids, recorder=rec)               # [B, vocab] for the last position
    ids = model.generate(ids, 8)                            # needs plan_run(..., keep_caches="all")

The real checkpoint: `load_tokenizer(path)`, `encode_prompt(tok, text, cfg)`, then the same two lines.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dslib import sparse
from dslib.attention import RMSNorm
from dslib.checkpoint import CheckpointError, SafetensorsSource, TensorSource, load_layer, load_part, refill
from dslib.config import ModelConfig
from dslib.devices import RunPlan
from dslib.moe import MoE
from dslib.record import SummaryRecorder
from dslib.sparse import DSACache

__all__ = ["StreamedModel", "StreamCache", "LayerTiming", "NonFiniteError", "load_tokenizer", "encode_prompt",
           "run_layer", "check_finite", "is_moe", "recorded_prefill", "default_queries"]


class NonFiniteError(RuntimeError):
    """A layer produced NaN or inf. The message names the layer and the first bad token."""


@dataclass
class LayerTiming:
    """Seconds one layer took in one pass (CUDA-event times on a GPU). indexer_s is part of attention_s (None when
    it could not be separated)."""

    layer: int
    kind: str  # "dense" | "moe"
    resident: bool
    load_s: float
    attention_s: float
    indexer_s: float | None
    ffn_s: float
    tokens: int

    @property
    def total_s(self) -> float:
        return self.load_s + self.attention_s + self.ffn_s

    def as_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


class StreamCache:
    """The caches a streamed run keeps: one `DSACache` per kept layer (all layers, or the resident ones)."""

    def __init__(self, layers: list[int], max_len: int):
        self.max_len = max_len
        self.layers = {i: DSACache(max_len=max_len) for i in layers}

    def __len__(self) -> int:
        lengths = {len(c) for c in self.layers.values()}
        if len(lengths) > 1:
            raise RuntimeError(f"the kept layer caches hold different numbers of tokens: {sorted(lengths)}")
        return lengths.pop() if lengths else 0

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> DSACache:
        return self.layers[layer]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers.values())


# ----------------------------------------------------------------------------------------------- one layer
def is_moe(layer: nn.Module) -> bool:
    return isinstance(layer.mlp, MoE)


class _Clock:
    """Phase times without a host sync per phase: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> int:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return len(self.marks) - 1

    def seconds(self, a: int, b: int) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]


@contextlib.contextmanager
def _indexer_timer(attn: nn.Module, clock: _Clock):
    """Time the indexer + top-k of a layer while it runs (yields a list of (start, end) marks): forward hooks on
    `attn.indexer` (the torch path scores there), and for as long as the layer runs, timing wrappers around the two
    functions DSAttention calls for the selection (`dslib.sparse.topk_selection`, and the kernel
    `dslib.kernels.indexer.index_topk` when it is loaded). Instrumentation only: the numbers are not touched."""
    spans: list[list[int]] = []
    handles = []
    if isinstance(getattr(attn, "indexer", None), nn.Module):
        handles = [attn.indexer.register_forward_pre_hook(lambda *a: spans.append([clock.mark()])),
                   attn.indexer.register_forward_hook(lambda *a: spans[-1].append(clock.mark()))]
    targets = [(sparse, "topk_selection")]
    kern = sys.modules.get("dslib.kernels.indexer")
    if kern is not None and hasattr(kern, "index_topk"):
        targets.append((kern, "index_topk"))
    saved = [(mod, name, getattr(mod, name)) for mod, name in targets]

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            a = clock.mark()
            out = fn(*args, **kwargs)
            spans.append([a, clock.mark()])
            return out
        return wrapper

    for mod, name, fn in saved:
        setattr(mod, name, timed(fn))
    try:
        yield spans
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        for h in handles:
            h.remove()


def run_layer(layer: nn.Module, x: torch.Tensor, cache: DSACache, *, attn_chunk: int, moe_chunk: int,
              positions: torch.Tensor | None = None, recorder=None, clock: _Clock | None = None, timed: bool = True,
              **options) -> dict:
    """One decoder layer over x `[B, T, d]` **in place**, chunked: `attn_chunk` queries at a time through the
    attention (their latents and indexer keys are appended to `cache`, which holds the earlier tokens), then
    `moe_chunk` tokens at a time through the FFN. Same result as `x = layer(x, positions, cache, **options)`.
    positions: None = len(cache) + arange(T) (no host sync to check them). options: attention / mode / window /
    precision / backend, as `DSAttention.forward` takes them. Returns the phase times {"attention_s",
    "indexer_s" (indexer + top-k, part of the attention; None if not seen), "ffn_s"}; with timed=False nothing is
    timed (no events, no sync: what CUDA-graph capture needs) and the times are None."""
    T = x.shape[1]
    takes_backend = "backend" in inspect.signature(layer.mlp.forward).parameters  # MoE does, the dense FFN not
    mlp_kw = {"backend": options["backend"]} if "backend" in options and takes_backend else {}
    if not timed:
        for s in range(0, T, attn_chunk):
            sl = slice(s, min(T, s + attn_chunk))
            x[:, sl] += layer.self_attn(layer.input_layernorm(x[:, sl]), None if positions is None else positions[sl],
                                        cache, recorder=recorder, **options)
        for s in range(0, T, moe_chunk):
            sl = slice(s, min(T, s + moe_chunk))
            x[:, sl] += layer.mlp(layer.post_attention_layernorm(x[:, sl]), recorder=recorder, **mlp_kw)
        return {"attention_s": None, "indexer_s": None, "ffn_s": None}
    clock = clock or _Clock(x.device)
    with _indexer_timer(layer.self_attn, clock) as spans:
        t0 = clock.mark()
        for s in range(0, T, attn_chunk):
            sl = slice(s, min(T, s + attn_chunk))
            h = layer.input_layernorm(x[:, sl])
            x[:, sl] += layer.self_attn(h, None if positions is None else positions[sl], cache, recorder=recorder,
                                        **options)
        t1 = clock.mark()
    for s in range(0, T, moe_chunk):
        sl = slice(s, min(T, s + moe_chunk))
        h = layer.post_attention_layernorm(x[:, sl])
        x[:, sl] += layer.mlp(h, recorder=recorder, **mlp_kw)
    t2 = clock.mark()
    done = [sp for sp in spans if len(sp) == 2]
    return {"attention_s": clock.seconds(t0, t1), "ffn_s": clock.seconds(t1, t2),
            "indexer_s": sum(clock.seconds(a, b) for a, b in done) if done else None}


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise `NonFiniteError` naming `where` and the first token whose hidden state holds NaN or inf."""
    if bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).flatten(2).any(-1).nonzero()
    b, t = (int(v) for v in bad[0])
    raise NonFiniteError(
        f"{where} produced NaN or inf (first at batch {b}, token {t}; {len(bad)} token(s) affected). The weights of "
        "this layer or the ones before it are corrupt, or their scale overflows the dtype: check them (e.g. "
        "torch.isfinite on each tensor of the layer) or run in float32."
    )


# ----------------------------------------------------------------------------------------------- the model
class StreamedModel:
    """DeepSeek-V3.2 run by a `RunPlan`: resident layers stay loaded, streamed layers are loaded for each pass and
    freed after it. `prefill` (layer-major over the whole prompt), `step` (one more token), `generate` (greedy).

    source: a checkpoint folder or any `TensorSource` (a `SyntheticFP8Source` on the GPU for full-size runs).
    FP8 linears stay FP8 (`FP8Linear`) when the source stores them so; other tensors are held in `dtype`.
    switches (attention, mode, window, precision, backend) are passed to every layer.
    """

    def __init__(self, source: str | Path | TensorSource, plan: RunPlan, *, dtype: torch.dtype = torch.bfloat16,
                 attention: str = "sparse", mode: str = "absorbed", window: int | None = None,
                 precision: str | None = None, backend: str | None = None, prefetch: bool = True):
        self.source = source if isinstance(source, TensorSource) else SafetensorsSource(source)
        self.cfg: ModelConfig = self.source.config
        self.plan, self.dtype = plan, dtype
        L = self.cfg.num_hidden_layers
        if sorted(plan.layer_device) != list(range(L)):
            raise ValueError(f"the plan places {len(plan.layer_device)} layers, the checkpoint has {L}: make the plan "
                             "from this checkpoint's config (plan_run(source.config, ...)).")
        switches = dict(attention=attention, mode=mode, window=window, precision=precision,
                        backend=backend if backend is not None else plan.backend)
        self.switches = {k: v for k, v in switches.items() if v is not None}
        if self.switches["backend"] == "triton":
            try:  # load the kernels now, so the per-layer timing sees them from the first layer on
                import dslib.kernels.indexer  # noqa: F401
            except ImportError:
                pass  # DSAttention warns once and runs the torch path
        self.keep_fp8 = any(s.dtype == torch.float8_e4m3fn for s in self.source.specs().values())
        self.device_of = {i: torch.device(d) for i, d in plan.layer_device.items()}
        first, last = self.device_of[0], self.device_of[L - 1]
        cfg = self.cfg
        with torch.device("meta"):  # shapes only: the loader gives every tensor its storage
            embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed_tokens = load_part(self.source, "model.embed_tokens.", embed, first, dtype)
        self.norm = load_part(self.source, "model.norm.", norm, last, dtype)
        self.lm_head = load_part(self.source, "lm_head.", head, last, dtype)
        self.resident: dict[int, nn.Module] = {}
        self.load_seconds: dict[int, float] = {}
        on_host = getattr(self.source, "device", torch.device("cpu")).type == "cpu"
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch and on_host and plan.streamed else None
        self._pending: tuple[int, object] | None = None
        self._spare: dict[str, tuple[nn.Module, torch.device]] = {}
        self.timings: list[LayerTiming] = []
        self.last_cache: StreamCache | None = None

    # ------------------------------------------------------------------------------------------- layers
    def _load(self, i: int, device: torch.device) -> nn.Module:
        return load_layer(self.source, i, device, self.dtype, keep_fp8=self.keep_fp8)

    def layer(self, i: int) -> tuple[nn.Module, float]:
        """Layer i on its device and the seconds its loading took now (0 for a resident layer loaded before)."""
        if i in self.resident:
            return self.resident[i], 0.0
        dev = self.device_of[i]
        _sync(dev)
        t0 = time.perf_counter()
        kind = "moe" if self.cfg.is_moe_layer(i) else "dense"
        spare = self._spare.pop(kind, None)
        if spare is not None and spare[1] != dev:
            spare = None
        if self._pending is not None and self._pending[0] == i:
            host = self._pending[1].result()  # read ahead on the host
            self._pending = None
            if spare is not None:  # into the streamed slot's tensors
                layer = _renumber(spare[0], i)
                with torch.no_grad():
                    for t, h in zip(layer.state_dict(keep_vars=True).values(), host.state_dict().values()):
                        t.copy_(h)
            else:
                layer = host.to(dev)
        elif spare is not None:  # the previous streamed layer's module: overwrite its tensors, allocate nothing
            layer = refill(_renumber(spare[0], i), self.source, f"model.layers.{i}.")
        else:
            layer = self._load(i, dev)
        self._stack(layer, dev)
        _sync(dev)
        seconds = time.perf_counter() - t0
        if i in self.plan.resident:
            self.resident[i] = layer
            self.load_seconds[i] = seconds
        return layer, seconds

    def release(self, i: int, layer: nn.Module) -> None:
        """Done with layer i for this pass: a resident layer stays; a streamed one is kept as the spare module the
        next streamed layer of its kind is read into (one spare at a time: the plan's one streaming slot)."""
        if i in self.resident:
            return
        kind = "moe" if self.cfg.is_moe_layer(i) else "dense"
        self._spare = {kind: (layer, self.device_of[i])}

    def _stack(self, layer: nn.Module, device: torch.device) -> None:
        """backend="triton" on a GPU: stack the MoE experts for the grouped kernel now, as part of loading (else the
        first call would), so the FFN time is compute only."""
        if self.switches.get("backend") != "triton" or device.type != "cuda" or not is_moe(layer):
            return
        try:
            from dslib.kernels.moe import stack_experts
        except ImportError:
            return
        stack_experts(layer.mlp)

    def _read_ahead(self, after: int) -> None:
        """Start reading the next streamed layer after `after` into host memory (file sources only)."""
        if self._pool is None or self._pending is not None:
            return
        nxt = next((j for j in self.plan.streamed if j > after), None)
        if nxt is not None:
            self._pending = (nxt, self._pool.submit(self._load, nxt, torch.device("cpu")))

    def load_resident(self) -> float:
        """Load every resident layer now (otherwise each is loaded on first use). Returns the seconds it took."""
        return sum(self.layer(i)[1] for i in self.plan.resident)

    def new_cache(self, *, keep: str | None = None, max_len: int | None = None) -> StreamCache:
        """Caches for the layers the plan keeps ("resident" or "all"), sized for max_len tokens."""
        keep = keep or self.plan.keep_caches
        layers = self.plan.resident if keep == "resident" else list(range(self.cfg.num_hidden_layers))
        return StreamCache(layers, max_len or self.plan.prompt_len)

    # ------------------------------------------------------------------------------------------- passes
    def check_input(self, input_ids: torch.Tensor, start: int = 0) -> None:
        cfg = self.cfg
        integer = isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.int32, torch.int64)
        if not integer or input_ids.dim() != 2:
            raise ValueError("input_ids must be an integer tensor [batch, seq]; use ids[None] for one sequence.")
        if start + input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"{start} cached + {input_ids.shape[1]:,} new tokens exceed max_position_embeddings="
                f"{cfg.max_position_embeddings:,}, the longest context the model has positions for. Shorten the prompt."
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in 0..{cfg.vocab_size - 1} (vocab_size); were they made by another "
                             "model's tokenizer?")
        if start == 0 and input_ids.shape[1] > self.plan.prompt_len:
            raise ValueError(f"the plan was made for prompts of up to {self.plan.prompt_len:,} tokens, got "
                             f"{input_ids.shape[1]:,}: make a new plan (plan_run(..., prompt_len=...)).")
        if input_ids.shape[0] > self.plan.batch:
            raise ValueError(f"the plan was made for batch {self.plan.batch}, got {input_ids.shape[0]}.")

    @torch.no_grad()
    def forward_layers(self, x: torch.Tensor, start: int, cache: StreamCache | None, layers, *, recorder=None,
                       check: bool = True, timings: list | None = None, on_layer=None) -> torch.Tensor:
        """Run hidden states x `[B, T, d]` of the tokens at positions start..start+T-1 through `layers` (ascending
        indices) in layer-major order; returns x (updated in place on each layer's device). Kept layer caches
        must hold `start` tokens; other layers get a temporary cache (then start must be 0: a prefill). Each
        layer's `LayerTiming` is appended to `timings` and passed to `on_layer` (e.g. to flush a recording)."""
        T = x.shape[1]
        for i in layers:
            layer, load_s = self.layer(i)
            self._read_ahead(i)
            x = x.to(self.device_of[i])
            if cache is not None and i in cache:
                layer_cache = cache[i]
            elif start == 0:
                layer_cache = DSACache(max_len=T)
            else:
                raise ValueError(f"layer {i} has no cache of the {start} earlier tokens: use a cache that keeps every "
                                 "layer (plan_run(..., keep_caches='all'), model.new_cache(keep='all')).")
            if len(layer_cache) != start:
                raise ValueError(f"layer {i}'s cache holds {len(layer_cache)} tokens, the input starts at position "
                                 f"{start}.")
            moe = is_moe(layer)
            if recorder is not None and moe and hasattr(recorder, "note_gate"):
                recorder.note_gate(i, layer.mlp.gate)
            timed = timings is not None or on_layer is not None
            phases = run_layer(layer, x, layer_cache, attn_chunk=self.plan.attn_chunk, moe_chunk=self.plan.moe_chunk,
                               recorder=recorder, timed=timed, **self.switches)
            if check:
                check_finite(x, f"layer {i} ({'MoE' if moe else 'dense'})")
            if timed:
                timing = LayerTiming(i, "moe" if moe else "dense", i in self.resident, load_s,
                                     phases["attention_s"], phases["indexer_s"], phases["ffn_s"], T * x.shape[0])
                if timings is not None:
                    timings.append(timing)
            self.release(i, layer)
            del layer, layer_cache
            if on_layer is not None:
                on_layer(timing)
        return x

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, *, cache: StreamCache | None = None, recorder=None,
                check: bool = True, on_layer=None) -> torch.Tensor:
        """The prompt `[B, T]` through every layer, layer-major; returns the last position's logits `[B, vocab]`
        (fp32). With a `cache` the tokens continue it (len(cache) earlier tokens); it stays available as
        `self.last_cache`. Per-layer times go to `self.timings` (and to `on_layer`, layer by layer)."""
        start = len(cache) if cache is not None else 0
        self.check_input(input_ids, start)
        first = self.device_of[0]
        x = self.embed_tokens(input_ids.to(first))  # [B, T, d]
        self.timings, self.last_cache = [], cache
        x = self.forward_layers(x, start, cache, range(self.cfg.num_hidden_layers), recorder=recorder,
                                check=check, timings=self.timings, on_layer=on_layer)
        last = self.device_of[self.cfg.num_hidden_layers - 1]
        logits = self.lm_head(self.norm(x[:, -1:].to(last))).float()[:, 0]  # [B, vocab]
        if check:
            check_finite(logits[:, None], "the LM head")
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                 recorder=None, cache: StreamCache | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding `[B, T] -> [B, T + n]` through the latent + indexer caches of every layer (streamed
        layers are read again for every new token: with streaming, each token costs a pass over the weights).
        To continue a prefill already run (`prefill(input_ids, cache=cache)`), pass its `cache` and `logits`."""
        if self.plan.keep_caches != "all":
            raise ValueError("generate needs every layer's cache: make the plan with plan_run(..., keep_caches='all', "
                             "max_new_tokens=n).")
        seq = input_ids
        if logits is None:
            cache = self.new_cache(keep="all", max_len=input_ids.shape[1] + max_new_tokens)
            logits = self.prefill(input_ids, cache=cache, recorder=recorder)
        elif cache is None or len(cache) != input_ids.shape[1]:
            raise ValueError("to continue a prefill pass the cache it filled (holding the prompt) with its logits.")
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).to(seq.device)  # [B]
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if (eos_token_id is not None and bool((nxt == eos_token_id).all())) or step == max_new_tokens - 1:
                break
            logits = self.prefill(nxt[:, None], cache=cache, recorder=recorder)
        return seq

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _renumber(layer: nn.Module, i: int) -> nn.Module:
    """Make a streamed layer's module layer i (the index its attention and MoE report to a recorder)."""
    layer.self_attn.layer_idx = i
    if hasattr(layer.mlp, "layer_idx"):
        layer.mlp.layer_idx = i
    return layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- the real checkpoint
def load_tokenizer(path: str | Path):
    """The checkpoint folder's `tokenizer.json`, read with the `tokenizers` library (no transformers needed)."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing. A DeepSeek-V3.2 checkpoint folder holds tokenizer.json next to config.json and the "
            "shards: copy it from the release (it is small), or tokenize the prompt yourself and pass token ids."
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


def encode_prompt(tokenizer, text: str, cfg: ModelConfig, *, add_bos: bool = True) -> torch.Tensor:
    """Token ids `[1, T]` of `text` (begin-of-sentence first, as DeepSeek's chat format starts); rejects a prompt
    longer than max_position_embeddings before anything is loaded."""
    ids = tokenizer.encode(text).ids
    bos = cfg.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if len(ids) > cfg.max_position_embeddings:
        raise ValueError(
            f"the prompt is {len(ids):,} tokens long, but max_position_embeddings={cfg.max_position_embeddings:,} "
            "is the longest context the model has positions for. Shorten the prompt."
        )
    if ids and max(ids) >= cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)} but the model's vocab_size is {cfg.vocab_size}: this "
                         "tokenizer.json belongs to another model.")
    return torch.tensor([ids], dtype=torch.long)


# ----------------------------------------------------------------------------------------------- a recorded run
def default_queries(prompt_len: int, window: int, *, samples: int = 64) -> tuple[list[int], list[int]]:
    """(strip queries, sample queries) for a recording: the last query, 3/4, 1/2 and 1/4 of the way, and one just
    past the window; `samples` positions spread evenly from the window to the end (for the layer overlap)."""
    T = prompt_len
    strips = sorted({T - 1, (3 * T) // 4, T // 2, T // 4, min(T - 1, 2 * window)})
    start = min(T - 1, window)
    samples = sorted({int(start + (T - 1 - start) * j / max(samples - 1, 1)) for j in range(samples)})
    return strips, samples


@torch.no_grad()
def recorded_prefill(model: StreamedModel, input_ids: torch.Tensor, *, cache: StreamCache | None = None,
                     ep_gpus: int = 8, on_layer=None, **meta) -> tuple[torch.Tensor, dict, SummaryRecorder]:
    """A prefill with a `SummaryRecorder` (strip and sample queries from `default_queries`), timed end to end
    (the pass, plus the loading of resident layers that were loaded before it, counted in their layers' load_s).
    Returns (last logits [B, vocab], the recording as a dict: summaries + per-layer timings + totals + `meta`,
    the recorder). `on_layer(timing, recorder)` is called after every layer (e.g. to flush a partial recording)."""
    cfg, device = model.cfg, model.device_of[0]
    T = input_ids.shape[1]
    strips, samples = default_queries(T, cfg.index_topk)
    rec = SummaryRecorder(cfg, prompt_len=T, strip_queries=strips, sample_queries=samples, ep_gpus=ep_gpus)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(input_ids, cache=cache, recorder=rec,
                           on_layer=None if on_layer is None else (lambda t: on_layer(t, rec)))
    _sync(device)
    seconds = time.perf_counter() - t0
    timings = [t.as_dict() for t in model.timings]
    before = 0.0
    for t in timings:  # resident layers loaded before the pass: their weights' time belongs to the run too
        if t["resident"] and t["load_s"] == 0 and t["layer"] in model.load_seconds:
            t["load_s"] = model.load_seconds[t["layer"]]
            t["total_s"] += t["load_s"]
            t["loaded_before_pass"] = True
            before += t["load_s"]
    totals = {key: sum(t[key] or 0.0 for t in timings) for key in ("load_s", "attention_s", "indexer_s", "ffn_s")}
    result = {"end_to_end_s": seconds + before, "pass_s": seconds, "tokens": T * input_ids.shape[0],
              "layers": len(timings), **totals}
    if device.type == "cuda":
        result["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    plan = model.plan
    recording = rec.to_dict(**meta, timings=timings, result=result, complete=True,
                            plan={"mode": plan.mode, "resident": plan.resident, "streamed": plan.streamed,
                                  "attn_chunk": plan.attn_chunk, "moe_chunk": plan.moe_chunk,
                                  "planned_peak_GiB": plan.peak_bytes() / 2**30, "backend": plan.backend})
    return logits, recording, rec
