"""Checkpoint I/O of chapter 5: sharded writing, lazy loading through sources, MTP skipped, device maps,
the recorder, and clear errors on bad input (the checkpoint folder is never modified: checked with checksums)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dslib
from dslib.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    RandomSource,
    SafetensorsSource,
    StateDictSource,
    checkpoint_tensors,
    load_pretrained,
    write_checkpoint,
    write_synthetic_checkpoint,
)
from dslib.config import ConfigError, ModelConfig
from dslib.devices import plan_devices
from dslib.model import DeepseekV32ForCausalLM
from dslib.record import Recorder

CFG = ModelConfig.tiny(index_n_heads=8)


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def sharded_fp8(tmp_path_factory) -> Path:
    """A small synthetic FP8 checkpoint in several shards + index."""
    return write_synthetic_checkpoint(CFG, tmp_path_factory.mktemp("fp8") / "ckpt", seed=3, fp8=True,
                                      max_shard_bytes=40_000, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ----------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("overrides",
                         [{}, {"q_lora_rank": None}, {"first_k_dense_replace": 0}, {"n_shared_experts": 2}])
def test_state_dict_names_are_the_checkpoint_names(overrides):
    cfg = CFG.replace(**overrides)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg)
    sd = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    table = {n: s.shape for n, s in checkpoint_tensors(cfg).items()}
    assert sd == table


# ----------------------------------------------------------------------------------------------- writing + loading
def test_sharded_fp8_checkpoint_layout(sharded_fp8):
    index = json.loads((sharded_fp8 / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    total = sum(s.nbytes for s in checkpoint_tensors(ModelConfig.from_pretrained(sharded_fp8), fp8=True).values())
    assert index["metadata"]["total_size"] == total
    for f in files:  # every weight shares its shard with its scale
        names = load_file(sharded_fp8 / f).keys()
        assert all(n[: -len("_scale_inv")] in names for n in names if n.endswith("_scale_inv"))


def test_file_and_random_source_load_the_same_model(sharded_fp8):
    """A synthetic checkpoint written to disk and the same seeded generator read directly give identical models."""
    from_disk = load_pretrained(sharded_fp8, progress=False)
    direct = load_pretrained(RandomSource(CFG, seed=3, fp8=True), progress=False)
    a, b = from_disk.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_disk.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_bf16_load_and_save_roundtrip(sharded_fp8, tmp_path):
    model = load_pretrained(sharded_fp8, dtype=torch.bfloat16, progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    out = dslib.checkpoint.save_pretrained(model, tmp_path / "bf16", progress=False)
    again = load_pretrained(out, dtype=torch.bfloat16, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_mtp_tensors_are_ignored(tmp_path):
    cfg = CFG.replace(num_nextn_predict_layers=1)
    path = write_checkpoint(RandomSource(cfg, seed=0, mtp=True, dtype=torch.float32), tmp_path / "mtp", progress=False)
    assert any(n.startswith("model.layers.3.") for n in SafetensorsSource(path).specs())  # layer 3 = the MTP
    model = load_pretrained(path, progress=False)
    assert len(model.model.layers) == 3


def test_device_map_and_recorder(sharded_fp8):
    """A memory plan's device map drives placement (pretend devices, all CPU here); the recorder sees every layer."""
    cfg = ModelConfig.from_pretrained(sharded_fp8)
    plan = plan_devices(cfg, [1e6, 1e6], storage="fp32", reserve_fraction=0, names=["cpu", "cpu"])
    model = load_pretrained(sharded_fp8, device_map=plan.device_map, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    rec = Recorder()
    with torch.no_grad():
        logits = model(ids, recorder=rec)
    assert logits.shape == (1, 12, cfg.vocab_size)
    assert rec.selection_layers == [0, 1, 2] and rec.moe_layers == [1, 2]
    assert rec.expert_load(1).sum() == 12 * cfg.num_experts_per_tok
    keys = rec.selected_keys(2, 11)
    assert len(keys) == cfg.index_topk and max(keys) <= 11
    assert rec.selected_keys(0, 2) == [0, 1, 2]  # fewer earlier tokens than the budget: all of them (dense)
    assert rec.selection_matrix(0).shape == (12, 12)


# ----------------------------------------------------------------------------------------------- bad input
def _expect(path: Path, error, match: str):
    before = checksums(path) if path.is_dir() else None
    with pytest.raises(error, match=match):
        load_pretrained(path, progress=False)
    if before is not None:
        assert checksums(path) == before, "the checkpoint folder was modified"


def test_missing_folder_and_config(tmp_path, sharded_fp8):
    _expect(tmp_path / "nowhere", FileNotFoundError, "No such checkpoint folder")
    broken = _copy(sharded_fp8, tmp_path / "noconfig")
    (broken / "config.json").unlink()
    _expect(broken, FileNotFoundError, "has no config.json")


def test_unknown_model_type(tmp_path, sharded_fp8):
    broken = _copy(sharded_fp8, tmp_path / "llama")
    raw = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    _expect(broken, ConfigError, "model_type='llama' is not supported")


def test_shard_listed_but_absent(tmp_path, sharded_fp8):
    broken = _copy(sharded_fp8, tmp_path / "absent")
    (broken / "model-00002-of-" f"{len(list(broken.glob('model-*'))):05d}.safetensors").unlink()
    _expect(broken, CheckpointError, r"listed in model.safetensors.index.json are absent.*Copy/download")


def test_truncated_shard(tmp_path, sharded_fp8):
    broken = _copy(sharded_fp8, tmp_path / "truncated")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _expect(broken, CheckpointError, f"{shard.name} is not a readable safetensors file.*corrupt or truncated")
    shard.write_bytes(b"\x00" * 10)
    _expect(broken, CheckpointError, "corrupt or truncated")


def _rewrite(folder: Path, edit) -> None:
    """Apply `edit(tensors)` to the shard that holds layer 1's q_b_proj, keeping the index consistent."""
    index = json.loads((folder / INDEX_FILE).read_text())
    name = "model.layers.1.self_attn.q_b_proj.weight"
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    edit(tensors, name)
    save_file(tensors, shard)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n in tensors or f != shard.name}
    (folder / INDEX_FILE).write_text(json.dumps(index))


def test_wrong_shape_missing_tensor_and_missing_scale(tmp_path, sharded_fp8):
    wrong = _copy(sharded_fp8, tmp_path / "shape")
    _rewrite(wrong, lambda t, n: t.__setitem__(n, t[n][:-1]))
    _expect(wrong, CheckpointError, r"q_b_proj.weight has shape \[63, 32\] but config.json implies \[64, 32\]")
    missing = _copy(sharded_fp8, tmp_path / "missing")
    _rewrite(missing, lambda t, n: (t.pop(n), t.pop(n + "_scale_inv")))
    _expect(missing, CheckpointError, r"lacks 1 tensor\(s\).*q_b_proj.weight")
    noscale = _copy(sharded_fp8, tmp_path / "noscale")
    _rewrite(noscale, lambda t, n: t.pop(n + "_scale_inv"))
    _expect(noscale, CheckpointError, r"stored in FP8.*weight_scale_inv is missing")


def test_writer_never_overwrites(sharded_fp8):
    before = checksums(sharded_fp8)
    with pytest.raises(CheckpointError, match="never overwrites"):
        write_checkpoint(StateDictSource({}, CFG), sharded_fp8, progress=False)
    assert checksums(sharded_fp8) == before


def test_bad_input_ids():
    model = DeepseekV32ForCausalLM(CFG)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in 0..127"):
        model(torch.tensor([[5, 400]]))
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        model(torch.zeros(1, CFG.max_position_embeddings + 1, dtype=torch.long))


def test_keep_fp8_storage_gives_the_same_logits(sharded_fp8):
    """FP8 storage (1 byte per weight, dequantised per call) computes exactly what the dequantised model computes,
    and its state_dict is the FP8 checkpoint itself."""
    from dslib.checkpoint import FP8Linear

    plain = load_pretrained(sharded_fp8, progress=False)
    fp8 = load_pretrained(sharded_fp8, progress=False, keep_fp8=True)
    assert isinstance(fp8.model.layers[1].mlp.experts[0].up_proj, FP8Linear)
    assert type(fp8.model.layers[1].self_attn.kv_b_proj) is torch.nn.Linear  # read directly by MLA: dequantised
    stored = SafetensorsSource(sharded_fp8)
    sd = fp8.state_dict()
    for name, spec in stored.specs().items():
        if spec.dtype == torch.float8_e4m3fn and "kv_b_proj" not in name:
            assert sd[name].dtype == torch.float8_e4m3fn
            assert torch.equal(sd[name + "_scale_inv"], stored.read(name + "_scale_inv"))
    ids = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(fp8(ids), plain(ids))
    fp8_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    assert fp8_bytes < 0.5 * sum(t.numel() * t.element_size() for t in plain.state_dict().values())


def test_keep_fp8_needs_an_fp8_checkpoint(tmp_path):
    path = write_checkpoint(RandomSource(CFG, seed=0, dtype=torch.float32), tmp_path / "fp32", progress=False)
    with pytest.raises(CheckpointError, match="holds none"):
        load_pretrained(path, keep_fp8=True, progress=False)


@pytest.mark.parametrize("cfg", [ModelConfig.deepseek_v32(), ModelConfig.small(), ModelConfig.tiny(q_lora_rank=None),
                                 ModelConfig.tiny(first_k_dense_replace=3)],
                                 ids=["671B", "small", "no-q-lora", "all-dense"])
def test_config_accounting_equals_the_modules(cfg):
    """Chapter 1's closed-form parameter counts (the estimate) equal the tensors of the modules themselves, which
    the checkpoint table reads off a meta-device build (the measurement): per component, total, with MTP."""
    table = checkpoint_tensors(cfg)
    assert sum(s.numel for s in table.values()) == cfg.total_params()
    assert sum(s.numel for s in checkpoint_tensors(cfg, mtp=True).values()) == cfg.total_params(mtp=True)
    c, last = cfg.param_counts(), f"model.layers.{cfg.num_hidden_layers - 1}."

    def numel(prefix, exclude="\0"):
        return sum(s.numel for n, s in table.items() if n.startswith(prefix) and exclude not in n)

    assert numel(last + "self_attn.", exclude=".indexer.") == c["attention"]
    assert numel(last + "self_attn.indexer.") == c["indexer"]
    assert numel(last + "mlp.") == (c["moe_mlp"] if cfg.is_moe_layer(cfg.num_hidden_layers - 1) else c["dense_mlp"])
    assert numel("model.layers.0.mlp.") == (c["moe_mlp"] if cfg.is_moe_layer(0) else c["dense_mlp"])
