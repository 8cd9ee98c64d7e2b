"""ModelConfig: the 671B numbers of REFERENCE.md §1–3, reading config.json, and clear errors."""
import json

import pytest

from dslib.config import ConfigError, ModelConfig

V32 = ModelConfig.deepseek_v32()


def test_parameter_totals_match_reference():
    assert V32.total_params(indexer=False) == 671_026_419_200  # V3 / V3.1 architecture
    assert V32.total_params() == 671_877_944_064  # V3.2 main model
    assert V32.total_params(mtp=True) == 685_355_329_792  # every tensor in the checkpoint ("685B")
    assert V32.num_hidden_layers * V32.param_counts()["indexer"] == 851_524_864


def test_component_counts_match_reference():
    c = V32.param_counts()
    assert c["attention"] == 187_105_280 + 2_048
    assert c["indexer"] == 13_959_424
    assert c["dense_mlp"] == 396_361_728
    assert c["expert"] == 44_040_192
    assert c["moe_mlp"] == 11_320_164_608


def test_active_parameters():
    assert round(V32.active_params(indexer=False) / 1e9, 2) == 37.55
    assert round(V32.active_params() / 1e9, 2) == 38.40


@pytest.mark.parametrize(
    "scheme,per_layer,per_token",
    [("mha", 81_920, 4_997_120), ("gqa", 4_096, 249_856), ("mqa", 512, 31_232),
     ("mla", 1_152, 70_272), ("mla_fp8", 656, 40_016), ("indexer", 132, 8_052)],
)
def test_kv_bytes_per_token(scheme, per_layer, per_token):
    assert V32.kv_bytes_per_token_per_layer(scheme) == per_layer
    assert V32.kv_cache_bytes(scheme, seq_len=1) == per_token


def test_mla_cache_at_128k():
    assert V32.kv_cache_bytes("mla", 131_072) / 1e9 == pytest.approx(9.21, abs=0.005)


def test_roundtrip_through_config_json(tmp_path):
    V32.save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path) == V32


def test_reads_transformers_rope_parameters(tmp_path):
    raw = V32.to_dict()
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn",
                              "rope_theta": raw.pop("rope_theta")}
    raw["layer_types"] = ["indexed_attention"] * 61  # transformers-only keys are ignored
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_pretrained(tmp_path) == V32


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v32", ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such checkpoint folder"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(n_routed_experts=10, n_group=4), "not divisible by n_group"),
        (dict(topk_group=1, num_experts_per_tok=3), "too few experts"),
        (dict(index_topk=0), "index_topk must be a positive integer"),
        (dict(index_topk=10_000), "larger than max_position_embeddings"),
        (dict(qk_rope_head_dim=7), "must be even"),
        (dict(hidden_size=-1), "hidden_size must be a positive integer"),
    ],
)
def test_inconsistent_fields_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.tiny(**change)


def test_inconsistent_config_json_names_the_file(tmp_path):
    raw = ModelConfig.tiny().to_dict() | {"n_group": 3}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="config.json.*not divisible"):
        ModelConfig.from_pretrained(tmp_path)
