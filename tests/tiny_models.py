"""Tiny random ERNIE 4.5 checkpoints written by transformers itself (the reference writer).

Weights are re-drawn larger than transformers' init (std 0.02) so logits are far from ties and
routing is decisive; otherwise greedy comparisons would test noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    use_bias=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(
    moe_num_experts=8,
    moe_k=3,
    moe_intermediate_size=24,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    moe_layer_end_index=-1,
    moe_layer_interval=1,
)

SHAPES = {
    "dense": dict(kind="dense"),
    "moe": dict(kind="moe"),
    "moe_no_shared": dict(kind="moe", moe_num_shared_experts=0),
    "moe_interval2": dict(kind="moe", moe_layer_interval=2, num_hidden_layers=5),
    "moe_sharded": dict(kind="moe", shard="60KB"),
    "moe_fused_names": dict(kind="moe", fused_names=True),
    # every matrix's input a multiple of 64: the shape the native int kernels take everywhere
    "moe_wide": dict(kind="moe", hidden_size=128, intermediate_size=256, head_dim=32, moe_intermediate_size=64),
    # GQA groups of 4 and an odd expert count: splits over 3 and 4 ranks that do not divide
    "moe_gqa8": dict(kind="moe", num_attention_heads=8, num_key_value_heads=2, moe_num_experts=7),
    "dense_bias": dict(kind="dense", use_bias=True),  # biases on q, k, v, o and the MLP
}


def reference_class(kind: str):
    from transformers import (
        Ernie4_5_MoeConfig,
        Ernie4_5_MoeForCausalLM,
        Ernie4_5Config,
        Ernie4_5ForCausalLM,
    )

    return (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM) if kind == "moe" else (Ernie4_5Config, Ernie4_5ForCausalLM)


def build_reference(kind: str = "moe", seed: int = 0, **overrides):
    cfg_cls, model_cls = reference_class(kind)
    values = dict(BASE, **(MOE if kind == "moe" else {}))
    values.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**values)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))  # large enough to change choices
            elif name.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def write_checkpoint(path: Path, shape: str = "moe", seed: int = 0, **overrides):
    """Write a tiny checkpoint with save_pretrained and return (path, the transformers model)."""
    spec = dict(SHAPES[shape])
    kind = spec.pop("kind")
    shard = spec.pop("shard", None)
    fused = spec.pop("fused_names", False)
    spec.update(overrides)
    model = build_reference(kind, seed, **spec)
    path.mkdir(parents=True, exist_ok=True)
    if fused:
        # The transformers-5 in-memory names, as a user saving state_dict() directly would get them.
        from safetensors.torch import save_file

        model.config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path, model


def load_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def edit_config(path: Path, **changes) -> None:
    cfg_path = path / "config.json"
    raw = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    cfg_path.write_text(json.dumps(raw))


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]


def write_full_vocab_checkpoint(path: Path, tokenizer_dir: Path, max_position_embeddings: int = 4096, extra=()):
    """A tiny MoE with the real tokenizer's 103,424-token vocabulary and its files beside the weights
    (plus `extra` files of the tokenizer directory): a model the commands take as a release.
    Returns (path, the transformers reference)."""
    path, ref = write_checkpoint(
        path, "moe", vocab_size=103424, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
    )
    for name in [*TOKENIZER_FILES, *extra]:
        shutil.copy(tokenizer_dir / name, path / name)
    return path, ref


def one_token_steps(path: Path, ids: torch.Tensor, dtype: torch.dtype, prompt: int = 8) -> torch.Tensor:
    """ernie's model at `path` in `dtype` on the CPU: the logits after ids[:, :prompt] as one forward,
    then after each later id as a one-token step ([1, T - prompt + 1, V], float32)."""
    from ernie_cli.weights.loader import load_model

    model = load_model(path, "cpu", dtype)
    cache = model.new_cache(1, ids.shape[1] + prompt)
    with torch.no_grad():
        out = [model(ids[:, :prompt], 0, cache)[:, -1:]]
        out += [model(ids[:, p : p + 1], p, cache) for p in range(prompt, ids.shape[1])]
    return torch.cat(out, 1).float()


def mean_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of the distributions two sets of logits give, averaged over positions."""
    return torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()


def native_and_torch_kl(path: Path, ids: torch.Tensor, monkeypatch, kern, method: str) -> tuple[float, float, int]:
    """Mean KL against the float32 model's one-token steps of the same bf16 steps run twice: through
    the native kernels (counting the calls of kern.method), then with ERNIE_NATIVE=0 (torch's bf16
    arithmetic, the yardstick). Returns (native KL, torch KL, calls)."""
    expected = one_token_steps(path, ids, torch.float32)
    calls = []
    real = getattr(kern, method)
    monkeypatch.setattr(kern, method, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    ours = mean_kl(expected, one_token_steps(path, ids, torch.bfloat16))
    count = len(calls)
    monkeypatch.setenv("ERNIE_NATIVE", "0")
    return ours, mean_kl(expected, one_token_steps(path, ids, torch.bfloat16)), count
