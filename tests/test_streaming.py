"""Chapter 6: the run plan, synthetic FP8 weights, layer streaming, the real-checkpoint path and bad input (CPU)."""
from __future__ import annotations

import pytest
import torch

from dslib.checkpoint import (
    FP8_DTYPE,
    CheckpointError,
    SafetensorsSource,
    TensorSource,
    dequantize_fp8_blocks,
    load_layer,
    load_pretrained,
)
from dslib.config import ModelConfig
from dslib.devices import (
    DevicePlanError,
    GiB,
    activation_bytes,
    cache_bytes_per_token,
    held_module_bytes,
    module_bytes,
    plan_run,
)
from dslib.sparse import DSACache
from dslib.streaming import NonFiniteError, StreamedModel, encode_prompt, load_tokenizer, run_layer
from dslib.synthetic import (
    SIGMA_Q,
    SyntheticFP8Source,
    file_checksums,
    train_test_tokenizer,
    write_synthetic_fp8_checkpoint,
)

H200 = 150.75e9
FULL = ModelConfig.deepseek_v32()


def small_cfg(**kw):
    return ModelConfig.small(**{"index_topk": 16, "num_hidden_layers": 4, **kw})


def cpu_plan(cfg, limit, T, **kw):
    kw = {"names": ["cpu"], "dtype_bytes": 4, "reserve_bytes": 0, **kw}
    return plan_run(cfg, [limit], prompt_len=T, **kw)


@pytest.fixture(scope="module")
def cfg():
    return small_cfg()


@pytest.fixture(scope="module")
def source(cfg):
    return SyntheticFP8Source(cfg, seed=3)


@pytest.fixture(scope="module")
def reference(source):
    return load_pretrained(source, progress=False, keep_fp8=True)


@pytest.fixture(scope="module")
def ids(cfg):
    return torch.randint(0, cfg.vocab_size, (1, 72), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------------------- the plan
def test_one_h200_streams_and_keeps_layers_resident_within_the_limit():
    plan = plan_run(FULL, [H200], prompt_len=131072, memory_limit=128 * GiB, backend="triton")
    assert plan.mode == "streaming"
    assert 5 <= len(plan.resident) < FULL.num_hidden_layers
    assert sorted(plan.resident + plan.streamed) == list(range(61))
    assert plan.peak_bytes() <= 128 * GiB
    assert plan.resident == list(range(len(plan.resident)))  # the first layers stay (the three dense ones included)
    # one streamed layer's slot is the largest layer
    assert plan.budget["cuda:0"]["stream_slot"] == max(held_module_bytes(FULL).values())


def test_eight_h200_hold_every_layer_resident():
    plan = plan_run(FULL, [H200] * 8, prompt_len=131072)
    assert plan.mode == "resident" and not plan.streamed
    assert all(plan.peak_bytes(d) <= H200 for d in plan.devices)
    assert set(plan.layer_device.values()) == {f"cuda:{i}" for i in range(8)}
    dm = plan.device_map
    assert dm["model.embed_tokens"] == "cuda:0" and dm["lm_head"] == "cuda:7"


def test_not_enough_memory_is_refused_before_loading_naming_gb_and_streaming():
    with pytest.raises(DevicePlanError) as err:
        plan_run(FULL, [H200], prompt_len=4096, streaming=False)
    msg = str(err.value)
    assert "GB" in msg and "streaming=True" in msg
    fewest = int(msg.split("at least ")[1].split(" device")[0])
    assert fewest == 5  # 682 GB over 150.75 GB devices, whole layers per device
    with pytest.raises(DevicePlanError, match=r"Streaming needs at least .* GB on cuda:0"):
        plan_run(FULL, [24e9], prompt_len=131072)


def test_prompt_longer_than_the_context_is_rejected_with_the_limit():
    with pytest.raises(ValueError, match="max_position_embeddings=163,840"):
        plan_run(FULL, [H200], prompt_len=FULL.max_position_embeddings + 1)


def test_held_bytes_and_cache_bytes():
    units, held = module_bytes(FULL), held_module_bytes(FULL)
    extra = held["model.layers.3"] - units["model.layers.3"]
    rows, cols = 128 * 256, 512  # kv_b_proj: held in bf16 instead of e4m3 + fp32 scales
    assert extra == rows * cols * 2 - rows * cols - (rows // 128) * (cols // 128) * 4
    assert cache_bytes_per_token(FULL) == (512 + 64 + 128) * 2 == 1408


def test_chunks_shrink_with_the_context_and_stay_in_budget():
    budget = 20 * GiB
    short = plan_run(FULL, [H200] * 8, prompt_len=8192)
    long = plan_run(FULL, [H200] * 8, prompt_len=131072)
    assert long.attn_chunk < short.attn_chunk
    for be in ("torch", "triton"):
        p = plan_run(FULL, [H200] * 8, prompt_len=131072, backend=be)
        assert activation_bytes(FULL, p.attn_chunk, 131072, backend=be) <= budget
    # the fused indexer does not build [256, H_I, S] per-head scores: bigger chunks fit
    assert plan_run(FULL, [H200] * 8, prompt_len=131072, backend="triton").attn_chunk > long.attn_chunk


# ----------------------------------------------------------------------------------------------- synthetic weights
def test_synthetic_fp8_weights_are_seeded_pow2_scaled_and_sized(source, cfg):
    again, other = SyntheticFP8Source(cfg, seed=3), SyntheticFP8Source(cfg, seed=4)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    a, b, c = source.make(name), again.make(name), other.make(name)
    assert a.dtype == FP8_DTYPE and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(a.view(torch.uint8), c.view(torch.uint8))
    assert torch.isfinite(a.float()).all() and a.float().abs().max() <= 448
    s = source.make(name + "_scale_inv")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    # a large matrix: the codes' std is SIGMA_Q, the dequantised weight's std what weight_std() says
    big = SyntheticFP8Source(ModelConfig.small(hidden_size=1024, moe_intermediate_size=1024), seed=0)
    n = "model.layers.1.mlp.experts.0.gate_proj.weight"
    q, scale = big.make(n), big.make(n + "_scale_inv")
    assert abs(q.float().std().item() / SIGMA_Q - 1) < 0.02
    assert abs(dequantize_fp8_blocks(q, scale).std().item() / big.weight_std() - 1) < 0.1
    assert big.config.quantization_config["scale_fmt"] == "ue8m0"


def test_synthetic_source_loads_like_a_checkpoint_and_writes_one(tmp_path, source, cfg):
    path = write_synthetic_fp8_checkpoint(cfg, tmp_path / "ck", seed=3, max_shard_bytes=400_000, progress=False)
    files = SafetensorsSource(path)
    assert len(files.groups()) > 1
    for i in (0, 2):  # dense and MoE layer: the stored bytes are the source's, bit for bit
        a = load_layer(files, i, keep_fp8=True).state_dict()
        b = load_layer(source, i, keep_fp8=True).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


# ----------------------------------------------------------------------------------------------- streaming
def test_run_layer_in_chunks_equals_the_decoder_layer(source, cfg):
    layer = load_layer(source, 1, keep_fp8=True)  # a MoE layer
    x = torch.randn(2, 40, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)
    with torch.no_grad():
        want = layer(x, pos, DSACache())
        got = x.clone()
        run_layer(layer, got, DSACache(max_len=40), attn_chunk=16, moe_chunk=24)
    assert (got - want).abs().max() < 1e-5


def test_streamed_prefill_and_generation_equal_the_resident_model(source, reference, ids, cfg):
    plan = cpu_plan(cfg, 8e6, ids.shape[1], streaming=True, attn_chunk=32, moe_chunk=48, keep_caches="all",
                    max_new_tokens=5)
    assert plan.mode == "streaming" and plan.streamed and plan.resident
    model = StreamedModel(source, plan, dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids)[:, -1]
    assert (model.prefill(ids) - want).abs().max() < 1e-5
    assert [t.layer for t in model.timings] == list(range(cfg.num_hidden_layers))
    assert [t.resident for t in model.timings] == [i in plan.resident for i in range(cfg.num_hidden_layers)]
    assert torch.equal(model.generate(ids, 5), reference.generate(ids, 5))


def test_streaming_from_a_checkpoint_folder_with_read_ahead(tmp_path, source, reference, ids, cfg):
    path = write_synthetic_fp8_checkpoint(cfg, tmp_path / "ck", seed=3, max_shard_bytes=400_000, progress=False)
    before = file_checksums(path)
    plan = cpu_plan(cfg, 8e6, ids.shape[1], streaming=True)
    model = StreamedModel(path, plan, dtype=torch.float32)
    assert model._pool is not None  # file layers are read one ahead in a thread
    with torch.no_grad():
        want = reference(ids)[:, -1]
    assert (model.prefill(ids) - want).abs().max() < 1e-5
    model.close()
    assert file_checksums(path) == before


def test_two_devices_split_the_layers(source, reference, ids, cfg):
    plan = plan_run(cfg, [6e6, 6e6], prompt_len=ids.shape[1], names=["cpu", "cpu"], dtype_bytes=4, reserve_bytes=0,
                    streaming=True)
    assert len(set(plan.layer_device.values())) == 1 and plan.streamed
    model = StreamedModel(source, plan, dtype=torch.float32)
    with torch.no_grad():
        assert (model.prefill(ids) - reference(ids)[:, -1]).abs().max() < 1e-5


def test_generate_needs_every_layer_cache(source, ids, cfg):
    plan = cpu_plan(cfg, 8e6, ids.shape[1], streaming=True)
    with pytest.raises(ValueError, match="keep_caches='all'"):
        StreamedModel(source, plan, dtype=torch.float32).generate(ids, 2)


class _Poisoned(TensorSource):
    """A source whose layer `bad` has an infinite weight (a corrupt checkpoint)."""

    def __init__(self, inner, bad):
        self.inner, self.config, self.description, self.bad = inner, inner.config, "poisoned", bad

    def specs(self):
        return self.inner.specs()

    def groups(self):
        return self.inner.groups()

    def open(self, group):
        import contextlib

        @contextlib.contextmanager
        def cm():
            with self.inner.open(group) as get:
                def poisoned(name, out=None):  # the loader may offer a slot; read into a fresh tensor instead
                    t = get(name)
                    if name == f"model.layers.{self.bad}.post_attention_layernorm.weight":
                        t = t.clone()
                        t[0] = float("inf")
                    return t
                yield poisoned
        return cm()


def test_nan_or_inf_in_a_layer_output_names_the_layer(source, ids, cfg):
    plan = cpu_plan(cfg, 8e6, ids.shape[1], streaming=True)
    model = StreamedModel(_Poisoned(source, 2), plan, dtype=torch.float32)
    with pytest.raises(NonFiniteError, match=r"layer 2 \(MoE\) produced NaN or inf"):
        model.prefill(ids)


# ------------------------------------------------------------------------------------------ the real checkpoint path
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cfg):
    path = write_synthetic_fp8_checkpoint(cfg, tmp_path_factory.mktemp("official") / "DeepSeek-V3.2", seed=3,
                                          max_shard_bytes=400_000, progress=False)
    texts = ["DeepSeek Sparse Attention keeps the top-k tokens the lightning indexer scores highest. " * 3,
             "Mixture of experts: every token goes to eight of 256 routed experts and the shared expert."]
    train_test_tokenizer(path, texts, vocab_size=300)
    return path


def test_checkpoint_folder_tokenize_prefill_generate_text(checkpoint, reference):
    before = file_checksums(checkpoint)
    tok = load_tokenizer(checkpoint)
    source = SafetensorsSource(checkpoint)
    ids = encode_prompt(tok, "the lightning indexer scores tokens", source.config)
    assert ids[0, 0] == source.config.bos_token_id == 0 and tok.id_to_token(0) == "<｜begin▁of▁sentence｜>"
    plan = cpu_plan(source.config, 8e6, ids.shape[1], streaming=True, keep_caches="all", max_new_tokens=4)
    out = StreamedModel(source, plan, dtype=torch.float32).generate(ids, 4)
    assert torch.equal(out, reference.generate(ids, 4))
    assert isinstance(tok.decode(out[0].tolist()), str)
    assert file_checksums(checkpoint) == before


def test_bad_input_on_a_checkpoint_changes_no_file(checkpoint, tmp_path):
    before = file_checksums(checkpoint)
    tok = load_tokenizer(checkpoint)
    cfg = SafetensorsSource(checkpoint).config
    with pytest.raises(ValueError, match=f"max_position_embeddings={cfg.max_position_embeddings:,}"):
        encode_prompt(tok, "tokens " * (cfg.max_position_embeddings + 10), cfg)
    with pytest.raises(DevicePlanError, match="streaming=True"):
        cpu_plan(cfg, 2e6, 64, streaming=False)
    # a folder without tokenizer.json: the error names the file
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_tokenizer(bare)
    plan = cpu_plan(cfg, 8e6, 64, streaming=True)
    model = StreamedModel(_Poisoned(SafetensorsSource(checkpoint), 1), plan, dtype=torch.float32)
    with pytest.raises(NonFiniteError, match="layer 1"):
        model.prefill(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.prefill(torch.zeros(1, cfg.max_position_embeddings + 1, dtype=torch.long))
    assert file_checksums(checkpoint) == before
