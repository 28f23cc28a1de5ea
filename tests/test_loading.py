"""Config parsing and every loading failure: each must name the key, file or tensor at fault."""

import json
import shutil

import pytest
import torch
from tiny_models import edit_config, write_checkpoint

from ernie_cli.errors import ErnieError
from ernie_cli.model.config import load_config, parse_config
from ernie_cli.weights.loader import load_model

REAL_CONFIG = {
    # The 21B-A3B values in Baidu's original style (../shared/docs/ernie-architecture.md §1.1).
    "architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072, "model_type": "ernie4_5_moe",
    "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28, "pad_token_id": 0,
    "rms_norm_eps": 1e-05, "use_cache": False, "vocab_size": 103424, "rope_theta": 500000, "use_rmsnorm": True,
    "tie_word_embeddings": True, "use_bias": False, "moe_num_experts": 64, "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_intermediate_size": 1536,
    "moe_capacity": [64, 64, 64], "moe_gate": "topk", "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": True,
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_ernie4_5_moe.Ernie4_5_MoeConfig"},
}


def test_original_release_config_of_21b():
    cfg = parse_config(REAL_CONFIG)
    assert cfg.is_moe and cfg.head_dim == 128 and cfg.rope_theta == 500000.0
    assert [cfg.is_moe_layer(i) for i in range(28)] == [False] + [True] * 27
    counts = cfg.parameter_counts()
    # Hand count from ../shared/docs/performance-facts.md §3.1: 21.825 B total, 3.352 B active.
    assert counts["total"] == 21_825_437_888
    assert abs(counts["active"] - 3.352e9) < 0.001e9


def test_transformers_native_config_with_aliases():
    raw = dict(REAL_CONFIG)
    for key in ("rope_theta", "moe_num_experts", "moe_k", "auto_map", "moe_capacity", "moe_gate"):
        raw.pop(key)
    raw.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_experts=64, num_experts_per_tok=6)
    cfg = parse_config(raw)
    assert (cfg.rope_theta, cfg.num_experts, cfg.num_experts_per_tok) == (10000.0, 64, 6)


def test_real_dense_config_from_shared(tokenizer_dir):
    cfg = load_config(tokenizer_dir)  # the recovered ERNIE-4.5-0.3B-Base-PT config.json
    assert not cfg.is_moe
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (1024, 18, 16, 2, 128)
    assert counts_match_transformers(tokenizer_dir)


def counts_match_transformers(path):
    from transformers import Ernie4_5Config

    raw = json.loads((path / "config.json").read_text())
    ref = Ernie4_5Config(**{k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")})
    ours = load_config(path)
    return (ref.hidden_size, ref.head_dim, ref.num_key_value_heads) == (ours.hidden_size, ours.head_dim, ours.num_key_value_heads)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"moe_k": 65}, "moe_k"),
        ({"hidden_size": 2561, "head_dim": None}, "num_attention_heads"),
        ({"hidden_size": None}, "hidden_size"),
        ({"moe_intermediate_size": None}, "moe_intermediate_size"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"moe_layer_end_index": 40}, "moe_layer_end_index"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(change, key):
    raw = dict(REAL_CONFIG)
    for k, v in change.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    with pytest.raises(ErnieError, match=key):
        parse_config(raw)


def _copy(checkpoints, tmp_path, shape):
    """A writable copy of a shared checkpoint, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(checkpoints(shape)[0], dst)
    return dst


@pytest.fixture
def moe_copy(checkpoints, tmp_path):
    return _copy(checkpoints, tmp_path, "moe")


@pytest.fixture
def sharded_copy(checkpoints, tmp_path):
    return _copy(checkpoints, tmp_path, "moe_sharded")


def _rewrite(path, drop=(), add=None, reshape=None):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    for name in drop:
        del state[name]
    state.update(add or {})
    for name, shape in (reshape or {}).items():
        state[name] = torch.zeros(shape)
    save_file(state, str(path), metadata={"format": "pt"})


def test_missing_tensor(moe_copy):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(moe_copy / "model.safetensors", drop=[name])
    with pytest.raises(ErnieError, match=rf"{name} is missing from model.safetensors"):
        load_model(moe_copy, "cpu", torch.float32)


def test_unexpected_tensor(moe_copy):
    _rewrite(moe_copy / "model.safetensors", add={"model.layers.1.mlp.surprise.weight": torch.zeros(2)})
    with pytest.raises(ErnieError, match=r"model.safetensors: unexpected tensor model.layers.1.mlp.surprise.weight"):
        load_model(moe_copy, "cpu", torch.float32)


def test_mtp_and_tied_head_tensors_are_skipped(moe_copy, checkpoints):
    _, ref = checkpoints("moe")
    _rewrite(
        moe_copy / "model.safetensors",
        add={"model.mtp_block.0.self_attn.q_proj.weight": torch.ones(3, 3), "lm_head.weight": torch.ones(512, 64)},
    )
    model = load_model(moe_copy, "cpu", torch.float32)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-4


def test_wrong_shape(moe_copy):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(moe_copy / "model.safetensors", reshape={name: (16, 64)})
    with pytest.raises(ErnieError, match=rf"model.safetensors: tensor {name} has shape \[16, 64\], config.json implies \[32, 64\]"):
        load_model(moe_copy, "cpu", torch.float32)


def test_shard_named_in_index_but_absent(sharded_copy):
    victim = sorted(sharded_copy.glob("model-*.safetensors"))[3]
    victim.unlink()
    with pytest.raises(ErnieError, match=rf"shard {victim.name} named in .*model.safetensors.index.json is missing"):
        load_model(sharded_copy, "cpu", torch.float32)


def test_index_promises_a_tensor_the_shard_lacks(sharded_copy):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    name, shard = next((n, s) for n, s in index["weight_map"].items() if "experts.3.down" in n)
    _rewrite(sharded_copy / shard, drop=[name])
    with pytest.raises(ErnieError, match=rf"{shard} does not hold tensor {name}"):
        load_model(sharded_copy, "cpu", torch.float32)


def test_truncated_file(moe_copy):
    path = moe_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ErnieError, match=r"model.safetensors is truncated: tensor \S+ ends at byte"):
        load_model(moe_copy, "cpu", torch.float32)


def test_corrupt_header(moe_copy):
    path = moe_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage\xff\xfe!!"
    path.write_bytes(bytes(data))
    with pytest.raises(ErnieError, match=r"model.safetensors is corrupt"):
        load_model(moe_copy, "cpu", torch.float32)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ErnieError, match="has no config.json"):
        load_model(tmp_path, "cpu", torch.float32)


def test_config_without_weights(tmp_path, moe_copy):
    (moe_copy / "model.safetensors").unlink()
    with pytest.raises(ErnieError, match="holds no safetensors weights"):
        load_model(moe_copy, "cpu", torch.float32)


def test_config_and_weights_disagree(moe_copy):
    edit_config(moe_copy, moe_intermediate_size=32)
    with pytest.raises(ErnieError, match=r"has shape \[24, 64\], config.json implies \[32, 64\]"):
        load_model(moe_copy, "cpu", torch.float32)


def test_model_too_big_for_memory_is_refused_before_loading(moe_copy, monkeypatch):
    import ernie_cli.weights.loader as loader

    monkeypatch.setattr(loader, "available_bytes", lambda device: 1000)
    with pytest.raises(ErnieError, match=r"needs about .* GiB but only 0.0 GiB is free on cpu: use a quantized copy"):
        load_model(moe_copy, "cpu", torch.float32)


def test_untied_checkpoint_loads_its_own_head(tmp_path):
    from tiny_models import load_reference

    path, _ = write_checkpoint(tmp_path / "untied", "dense", tie_word_embeddings=False)
    ref = load_reference(path)
    model = load_model(path, "cpu", torch.float32)
    ids = torch.arange(3, 30)[None]
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-4


def test_building_the_model_draws_no_random_weights(monkeypatch, checkpoints):
    """Every weight comes from the checkpoint, so building the (meta) model must not run an init: on
    the meta device torch's random init loads its Python meta kernels, a second of every start-up."""
    def refuse(*args, **kwargs):
        raise AssertionError("a random init ran while building the model")

    path, _ = checkpoints("moe")  # written by transformers, which does draw random weights
    monkeypatch.setattr(torch.Tensor, "normal_", refuse)
    monkeypatch.setattr(torch.Tensor, "uniform_", refuse)
    model = load_model(path, "cpu", "float32")
    assert model.embed_tokens.weight.device.type == "cpu"
