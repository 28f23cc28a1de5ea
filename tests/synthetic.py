"""Random ERNIE-shaped bf16 checkpoints of any size, written without transformers and in bounded memory.

For sizing and for the quantizer's memory and speed measurements: the tensors are named and shaped
as in the hub layout (one tensor per expert and projection, router and correction bias in float32),
so `ernie quantize` and the loader treat them exactly like a real release.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ernie_cli.model.config import parse_config
from ernie_cli.quant.io import OutTensor, ShardWriter

P = "model."


def moe_config(**overrides) -> dict:
    """A config.json dict in Baidu's style (defaults: a small MoE; pass the 21B values to go big)."""
    raw = {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_act": "silu",
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 500000, "tie_word_embeddings": True, "use_bias": False,
        "moe_num_experts": 16, "moe_k": 4, "moe_intermediate_size": 512, "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
    }
    raw.update(overrides)
    return raw


def hub_tensors(raw: dict) -> list[OutTensor]:
    cfg = parse_config(raw)
    h, d, bf = cfg.hidden_size, cfg.head_dim, torch.bfloat16
    out = [OutTensor(f"{P}embed_tokens.weight", bf, (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        L = f"{P}layers.{i}"
        out += [OutTensor(f"{L}.input_layernorm.weight", bf, (h,)), OutTensor(f"{L}.post_attention_layernorm.weight", bf, (h,))]
        qo, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        out += [
            OutTensor(f"{L}.self_attn.q_proj.weight", bf, (qo, h)),
            OutTensor(f"{L}.self_attn.k_proj.weight", bf, (kv, h)),
            OutTensor(f"{L}.self_attn.v_proj.weight", bf, (kv, h)),
            OutTensor(f"{L}.self_attn.o_proj.weight", bf, (h, qo)),
        ]

        def mlp(prefix: str, inter: int) -> list[OutTensor]:
            return [
                OutTensor(f"{prefix}.gate_proj.weight", bf, (inter, h)),
                OutTensor(f"{prefix}.up_proj.weight", bf, (inter, h)),
                OutTensor(f"{prefix}.down_proj.weight", bf, (h, inter)),
            ]

        if cfg.is_moe_layer(i):
            out += [
                OutTensor(f"{L}.mlp.gate.weight", torch.float32, (cfg.num_experts, h)),
                OutTensor(f"{L}.mlp.moe_statics.e_score_correction_bias", torch.float32, (1, cfg.num_experts)),
            ]
            for e in range(cfg.num_experts):
                out += mlp(f"{L}.mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.num_shared_experts:
                out += mlp(f"{L}.mlp.shared_experts", cfg.moe_intermediate_size * cfg.num_shared_experts)
        else:
            out += mlp(f"{L}.mlp", cfg.intermediate_size)
    out.append(OutTensor(f"{P}norm.weight", bf, (h,)))
    return out


def write_synthetic_checkpoint(path: Path | str, raw: dict | None = None, shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    """Write config.json and random bf16 weights (std 0.02, norms near 1) into `path`; returns the path."""
    path = Path(path)
    raw = raw or moe_config()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tensors = hub_tensors(raw)
    writer = ShardWriter(path, tensors, shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for t in writer.order:
        if t.name.endswith("norm.weight"):
            value = 1.0 + 0.05 * torch.randn(t.shape, generator=gen)
        elif t.name.endswith("e_score_correction_bias"):
            value = 0.01 * torch.randn(t.shape, generator=gen)
        else:
            value = torch.randn(t.shape, generator=gen) * (0.02 if not t.name.endswith("gate.weight") else 0.1)
        writer.write(t.name, value.to(t.dtype))
        del value
    writer.finish()
    return path
