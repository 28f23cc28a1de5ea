"""The ERNIE 4.5 forward pass (dense and MoE), as ../shared/docs/ernie-architecture.md §2 states it.

Config in; one forward (tokens, the first position, the KV cache) out. Decoding one token and
prefilling a prompt are the same forward with different shapes: the first position is an int for
an eager forward, or a one-element device tensor inside the CUDA graph of the one-token step.

The arithmetic that decides bits in float32 (RMSNorm's cast order, RoPE in fp32 with three
roundings, the fp32 router, weights taken from the unbiased probabilities) is kept exactly as
transformers' eager implementation does it. Which kernel computes each operation is decided in
ernie_cli/kernels/ops.py; a weight here is a float tensor or a quantized weight (ernie_cli.quant.weight),
and the operations take either.
"""

from __future__ import annotations

import torch
from torch import nn

from ernie_cli.kernels import ops
from ernie_cli.model.cache import KVCache, LayerCache, PagedDecode, PagedKVCache, Ragged
from ernie_cli.model.config import ErnieConfig
from ernie_cli.parallel.shard import Shard, plan_shard


def _weight(*shape: int, dtype=None) -> nn.Parameter:
    # No random init: every weight comes from the checkpoint (and the model is built on the meta device).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def set_weight(module: nn.Module, name: str, value) -> None:
    """Put a weight in place: a float tensor as a parameter, a quantized weight as a submodule."""
    module._parameters.pop(name, None)
    module._modules.pop(name, None)
    if isinstance(value, nn.Module):
        module._modules[name] = value
    else:
        module._parameters[name] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)


def set_param(model: nn.Module, name: str, value) -> None:
    """set_weight by the parameter's dotted name in the model (its state_dict name)."""
    owner, _, leaf = name.rpartition(".")
    set_weight(model.get_submodule(owner) if owner else model, leaf, value)


# ---- §2.2 RMSNorm ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual addition before the norm, and the norm: (x + delta, norm(x + delta))."""
        return ops.add_rms_norm(x, delta, self.weight, self.eps)


# ---- linear layers and the embedding ---------------------------------------------------------------


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _weight(out_features, in_features)
        self.bias = _weight(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = _weight(vocab, dim)

    def forward(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return ops.embed(tokens, self.weight, dtype)


# ---- §2.3 attention (RoPE applied inside ops.attention) ----------------------------------------------


def rope_table(head_dim: int, theta: float, max_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per position, already interleaved ([c0, c0, c1, c1, ...]), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)


class Attention(nn.Module):
    """The query heads this rank holds and the key/value heads they read (all of them in one process);
    o_proj then gives this rank's partial sum of the output."""

    def __init__(self, cfg: ErnieConfig, shard: Shard | None = None):
        super().__init__()
        shard = shard or plan_shard(cfg)
        self.n_heads, self.n_kv, self.head_dim = len(shard.heads), len(shard.kv_heads), cfg.head_dim
        h, bias = cfg.hidden_size, cfg.use_bias
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias and shard.leads)  # a bias is added once, not per rank
        self.qkv_proj: Linear | None = None  # q, k and v as one matrix, where the loader fused them
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start, cache: LayerCache) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.n_kv * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        return self.o_proj(ops.attention(q, k, v, cache.k, cache.v, cos, sin, start, self.scale))


# ---- §2.4 SwiGLU MLP (dense layers and the shared experts) -------------------------------------------


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, H] matrix (gate rows first).
    Split over ranks, each holds some of the I columns and down gives its partial sum."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, down_bias: bool | None = None):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias if down_bias is None else down_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def _mlp(cfg: ErnieConfig, shard: Shard, intermediate: int) -> MLP:
    """This rank's columns of an MLP of width `intermediate` (a bias on down is added once, not per rank)."""
    return MLP(cfg.hidden_size, len(shard.columns(intermediate)), cfg.use_bias, cfg.use_bias and shard.leads)


# ---- §2.5 MoE block ---------------------------------------------------------------------------------


class Router(nn.Module):
    """fp32 softmax router; the correction bias chooses experts but does not weigh them."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.top_k, self.norm_min = cfg.num_experts_per_tok, cfg.moe_norm_min
        self.weight = _weight(cfg.num_experts, cfg.hidden_size, dtype=torch.float32)
        self.e_score_correction_bias = _weight(cfg.num_experts, dtype=torch.float32)
        self.always = 0  # experts after the routed ones that every token takes at weight 1 (shared experts in the stack)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.route(x, self.weight, self.e_score_correction_bias, self.top_k, self.norm_min, self.always)


class Experts(nn.Module):
    """The routed experts of one layer, stacked: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
    Split over ranks (expert parallel), the stack holds only this rank's experts, `owned`."""

    def __init__(self, cfg: ErnieConfig, owned: range):
        super().__init__()
        e, h, i = len(owned), cfg.hidden_size, cfg.moe_intermediate_size
        self.owned = owned if e < cfg.num_experts else None  # None: every expert, ids as the router gives them
        self.gate_up_proj = _weight(e, 2 * i, h)
        self.down_proj = _weight(e, h, i)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return ops.experts(x, weights, idx, self.gate_up_proj, self.down_proj, self.owned)


class MoE(nn.Module):
    def __init__(self, cfg: ErnieConfig, shard: Shard):
        super().__init__()
        self.gate = Router(cfg)  # on every rank: each routes every token, to the same experts
        self.experts = Experts(cfg, shard.experts)
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = _mlp(cfg, shard, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.view(-1, h)
        weights, idx = self.gate(x)  # with the shared experts last where the loader moved them into the stack
        out = self.experts(x, weights, idx)  # one token on CUDA: an ops.Mixture, summed by the next residual addition
        if self.shared_experts is not None:  # added after the routed sum, as transformers does
            out = ops.summed(out) + self.shared_experts(x)
        return out.view(b, t, h)


# ---- §2.1 decoder layer and the whole model ---------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieConfig, index: int, shard: Shard):
        super().__init__()
        self.group = shard.group
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, shard) if cfg.is_moe_layer(index) else _mlp(cfg, shard, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, start,
                cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream entering the layer is x + delta, delta being the last layer's MLP
        output (None before the first layer); the stream leaving it is the returned pair's sum.
        Each residual addition is made by add_rms_norm together with the norm that follows it
        (one kernel on CUDA), the last one by the model's final norm."""
        # Split over ranks, attention and the MLP each give this rank's partial sum, and all_reduce
        # adds the ranks' sums (in one process it returns its input: the whole sum is already there).
        x, h = self.input_layernorm.add(x, delta)
        h = ops.all_reduce(self.self_attn(h, cos, sin, start, cache), self.group)
        x, h = self.post_attention_layernorm.add(x, h)
        return x, ops.all_reduce(self.mlp(h), self.group)


class ErnieForCausalLM(nn.Module):
    def __init__(self, cfg: ErnieConfig, shard: Shard | None = None):
        """shard: this process's part of a model split over several (parallel/shard.py); None: all of it."""
        super().__init__()
        self.config = cfg
        self.shard = shard or plan_shard(cfg)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.shard) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Untied checkpoints get their own head; ERNIE 4.5 releases tie it to the embedding.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.quantization = None  # an ernie_cli.quant.spec.QuantSpec when the weights are int8/int4

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms' dtype: a quantized embedding holds no float weight)."""
        return self.norm.weight.dtype

    def new_cache(self, batch: int, positions: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch, len(self.shard.kv_heads), positions, cfg.head_dim,
                       dtype or self.dtype, self.device, lambda n: rope_table(cfg.head_dim, cfg.rope_theta, n, self.device))

    def head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, start=0, cache: KVCache | PagedKVCache | None = None, last=None) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, T', V].

        start: an int, or a one-element device tensor (the one-token step inside a CUDA graph), or
        a Ragged batch: tokens [1, N] of several sequences, each at its own positions in a paged cache;
        or a PagedDecode batch: tokens [1, B], the next token of each of B sequences in a paged cache.
        last: None for every position's logits; an int or a one-element device tensor for that
        position's alone (T' = 1), which spares the head's product over the rest of a prompt; a
        longer tensor of indices for those positions' (a batch's last token of each sequence).
        Without a cache, one sized for this call is made (a one-off full forward)."""
        t = tokens.shape[1]
        if cache is None:
            cache = self.new_cache(tokens.shape[0], t)
        if isinstance(start, (torch.Tensor, PagedDecode, Ragged)):  # each attention reads its rows by position itself
            cos, sin = cache.rope_cos, cache.rope_sin
        else:
            if start + t > cache.capacity:
                raise ValueError(f"positions up to {start + t} exceed the cache of {cache.capacity}")
            cos, sin = cache.rope_cos[start : start + t], cache.rope_sin[start : start + t]
        x, delta = self.embed_tokens(tokens, self.dtype), None
        for layer, layer_cache in zip(self.layers, cache.layers):
            x, delta = layer(x, delta, cos, sin, start, layer_cache)
        if last is not None and t > 1:  # one position has nothing to pick (and its delta may be an ops.Mixture)
            if isinstance(last, torch.Tensor):
                x, delta = x.index_select(1, last), delta.index_select(1, last) if delta is not None else None
            else:
                x, delta = x[:, last:][:, :1], delta[:, last:][:, :1] if delta is not None else None  # a negative index counts from the end
        return ops.linear(self.norm.add(x, delta)[1], self.head_weight())
