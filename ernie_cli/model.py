"""The ERNIE 4.5 forward pass (dense and MoE), written to match transformers' eager implementation.

Sections follow ../shared/docs/ernie-architecture.md §2. Arithmetic that decides bits in float32
(RMSNorm's cast order, RoPE in fp32 with three roundings, the fp32 router, weights taken from the
unbiased probabilities) is kept exactly as transformers does it.

Two shapes of work, two expert paths:
- decode (one token): the selected experts' weights are gathered by index; no host sync, no
  data-dependent shape, no Python loop over experts, so the step can be captured in one CUDA graph.
- prefill (many tokens): tokens are grouped by expert and each expert runs one GEMM over its tokens,
  in ascending expert order like transformers' eager loop; on the GPU in bf16, all experts in two
  grouped GEMMs without a host sync (run_grouped_mm).
On the CPU the decode step uses the grouped path too: without a graph to capture, touching the
k selected experts through views beats copying their weights out first.

Eager CUDA steps (prefill) also take RMSNorm and RoPE from gpu_elementwise: one Triton kernel each
instead of eight torch kernels, because there Python queueing kernels is the bottleneck.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cli import gpu_attention, gpu_elementwise, gpu_gemv, gpu_grouped, gpu_router
from ernie_cli.config import ErnieConfig


# ---- §2.2 RMSNorm ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gpu_elementwise.usable(x):
            return gpu_elementwise.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # weight applied after the cast back, as transformers does


# ---- linear layers ---------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that one token on CUDA goes through gpu_gemv's kernel: inside the decode
    graph on the H200, cuBLAS's GEMV kernels read the 2.6–31 MB matrices of a layer at about 1.9 TB/s
    and the tied head at 4.1, the Triton kernel at 2.3–3.9 and 4.4 (benchmarks/gpu_gemv_bench.py,
    gpu_profile.py)."""
    flat = x.reshape(-1, x.shape[-1])
    if not gpu_gemv.usable(flat):
        return F.linear(x, weight, bias)
    y = gpu_gemv.gemv("float", flat[0], weight).view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear through `linear` above."""

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint (see Embedding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint, and on the meta device torch's
        init loads its Python meta kernels, about a second of every start-up."""


def concatenate_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing cat([p(x) for p in parts], -1), or None where the parts cannot merge.

    Quantized parts merge through their own `concatenate` (ernie_cli.quant.modules.QuantLinear)."""
    if all(type(p) in (nn.Linear, Linear) for p in parts):
        bias = parts[0].bias is not None
        merged = Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=bias, device="meta")
        merged.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if bias:
            merged.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        return merged
    concatenate = getattr(type(parts[0]), "concatenate", None)
    return concatenate(parts) if concatenate is not None else None


# ---- §2.3 interleaved (GPT-J style) rotary embedding -----------------------------------------------


def rope_table(head_dim: int, theta: float, max_positions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per position, already interleaved ([c0, c0, c1, c1, ...]), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(max_positions, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)


def _rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotates adjacent pairs, not halves."""
    return torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t: [B, heads, T, d]; cos/sin: [T, d] fp32. fp32 math, result cast back (three roundings)."""
    return (t.float() * cos + _rotate_pairs(t).float() * sin).to(t.dtype)


CACHE_BLOCK = 256  # KV cache capacities are multiples of this


# ---- KV cache --------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: [B, kv_heads, max_seq, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # only the filled part is read

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph-safe update at positions held in a device tensor; returns the whole buffers."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


# ---- §2.3 attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.use_bias
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=bias)
        self.qkv_proj = None  # q, k and v as one matrix once fuse_qkv() ran
        self.scale = self.head_dim**-0.5
        self.cache: KVCache | None = None

    def fuse_qkv(self) -> None:
        """Replace q_proj, k_proj and v_proj by one matrix: one kernel instead of three per decode
        step. The separate modules are dropped, so the weights are never held twice."""
        if self.qkv_proj is not None:
            return
        merged = concatenate_linears([self.q_proj, self.k_proj, self.v_proj])
        if merged is not None:
            self.qkv_proj = merged
            del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """start: the first position, as an int (eager), or a one-element device tensor (decode graph).
        cos/sin: the RoPE rows of the positions; in the decode graph, the whole tables (or the row at start)."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if isinstance(start, torch.Tensor) and gpu_attention.writes_cache(q, self.cache.k):
            # the decode graph: RoPE, the cache write and attention in the attention kernels
            out = gpu_attention.rotate_write_decode(q, k, v, self.cache.k, self.cache.v, cos, sin, start, self.scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if isinstance(start, torch.Tensor) and cos.shape[0] > 1:  # the decode graph's whole tables
            cos, sin = cos[start], sin[start]
        v = v.transpose(1, 2)
        if b == 1 and gpu_elementwise.usable(x):  # one kernel per tensor instead of eight
            q = gpu_elementwise.rope(q[0], cos, sin)[None].transpose(1, 2)
            k = gpu_elementwise.rope(k[0], cos, sin)[None].transpose(1, 2)
        else:
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if isinstance(start, torch.Tensor):
            k, v = self.cache.write_at(start, k, v)
            if gpu_attention.usable(q, k):  # reads only the filled slots, the length taken from start
                out = gpu_attention.decode(q, k, v, start, self.scale)
            else:  # static shapes for the CUDA graph: attend over the whole buffer, masking unfilled slots
                mask = (torch.arange(k.shape[2], device=x.device) <= start)[None, :]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        else:
            if self.cache is not None:
                k, v = self.cache.update(start, k, v)
            out = attend(q, k, v, start, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of T new queries (at positions start..start+T-1) over start+T keys."""
    t, s = q.shape[2], k.shape[2]
    if t == 1:
        mask, causal = None, False  # the one new query sees every cached key
    elif start == 0:
        mask, causal = None, True
    else:  # a chunk appended to a filled cache: query i sees keys j <= start + i
        rows = torch.arange(t, device=q.device)[:, None] + start
        mask, causal = torch.arange(s, device=q.device)[None, :] <= rows, False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


# ---- §2.4 SwiGLU MLP (dense layers and the shared experts) -------------------------------------------


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, H] matrix (gate rows first)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ---- §2.5 MoE block ---------------------------------------------------------------------------------


class Router(nn.Module):
    """fp32 softmax router; the correction bias chooses experts but does not weigh them."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.top_k, self.norm_min = cfg.num_experts_per_tok, cfg.moe_norm_min
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.always = 0  # experts after the routed ones that every token takes at weight 1 (MoE.fuse_shared_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if gpu_router.sums_logits(x):
            logits = gpu_router.one_token_logits(x, self.weight)
        else:
            logits = F.linear(x.float(), self.weight)
        if gpu_router.usable(logits):
            return gpu_router.route(logits, self.e_score_correction_bias, self.top_k, self.norm_min, x.dtype, self.always)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        _, idx = torch.topk(probs + self.e_score_correction_bias, self.top_k, dim=-1)
        weights = probs.gather(-1, idx)
        weights = (weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)).to(x.dtype)
        if self.always:
            fixed = torch.arange(logits.shape[-1], logits.shape[-1] + self.always, device=idx.device)
            idx = torch.cat([idx, fixed.expand(idx.shape[0], -1)], 1)
            weights = torch.cat([weights, weights.new_ones(idx.shape[0], self.always)], 1)
        return weights, idx


class Experts(nn.Module):
    """The routed experts of one layer, stacked: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and (x.device.type != "cpu" or torch.compiler.is_compiling()):
            return self.gathered(x, weights, idx)
        if self.uses_grouped_mm(x):
            return self.grouped_mm(x, weights, idx)
        return self.grouped(x, weights, idx)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether many tokens like x take the two grouped GEMMs (else one GEMM per expert)."""
        return x.device.type != "cpu" and x.dtype == torch.bfloat16 and GROUPED_MM is not None

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Graph-safe: gather the k selected experts of each token and run them as batched GEMVs.

        One token on CUDA: the Triton GEMVs of gpu_gemv, each reading only the selected experts' rows.
        Otherwise written as multiply-and-sum so that, compiled, Inductor fuses the gather into the
        reduction and reads each selected expert once; eagerly, einsum avoids the big product intermediate.
        """
        if gpu_gemv.usable(x):
            return run_selected(
                x, weights, idx,
                lambda v, e: gpu_gemv.gemv("float", v, self.gate_up_proj, experts=e),
                lambda h, e: gpu_gemv.gemv("float", h, self.down_proj, experts=e, per_expert_x=True),
            )
        if torch.compiler.is_compiling():
            gu = (self.gate_up_proj[idx] * x[:, None, None, :]).sum(-1)
            gate, up = gu.chunk(2, dim=-1)
            y = (self.down_proj[idx] * (F.silu(gate) * up)[:, :, None, :]).sum(-1)
        else:
            gate, up = torch.einsum("nh,nkoh->nko", x, self.gate_up_proj[idx]).chunk(2, dim=-1)
            y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down_proj[idx])
        return (y * weights[..., None]).sum(1)

    def grouped_mm(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return run_grouped_mm(x, weights, idx, self.gate_up_proj, self.down_proj)

    def append_shared(self, mlp: "MLP", count: int) -> bool:
        """Take the shared MLP in as `count` more experts (see MoE.fuse_shared_experts), where it is
        float like the stacks and has no bias; False, and nothing changed, where not."""
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        if not all(type(p) in (nn.Linear, Linear) and p.bias is None and p.weight.dtype == self.gate_up_proj.dtype
                   for p in (gate_up, down)):
            return False
        self.gate_up_proj = nn.Parameter(torch.cat([self.gate_up_proj, shared_gate_up_as_experts(gate_up.weight, count)]), requires_grad=False)
        self.down_proj = nn.Parameter(torch.cat([self.down_proj, shared_down_as_experts(down.weight, count)]), requires_grad=False)
        return True

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return run_grouped(self.expert, self.gate_up_proj.shape[0], x, weights, idx)


def shared_gate_up_as_experts(t: torch.Tensor, count: int) -> torch.Tensor:
    """The shared MLP's gate_up rows [gate (count*I), up (count*I)] (or any row-wise tensor of its
    quantized form) -> [count, 2I, ...]: expert s takes gate rows and up rows s*I to (s+1)*I."""
    rows = t.shape[0] // (2 * count)
    return t.view(2, count, rows, *t.shape[1:]).transpose(0, 1).reshape(count, 2 * rows, *t.shape[1:])


def shared_down_as_experts(t: torch.Tensor, count: int) -> torch.Tensor:
    """The shared MLP's down [H, count*I] (columns in the tensor's own units: int4 bytes, scale
    groups) -> [count, H, I]: expert s takes columns s*I to (s+1)*I. A per-row tensor (int8 scales
    [H]) holds for every part."""
    if t.dim() == 1:
        return t.expand(count, -1).clone()
    return t.view(t.shape[0], count, t.shape[1] // count).transpose(0, 1).contiguous()


def run_grouped(expert, num_experts: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One GEMM per selected expert (expert(x_e, e)), in ascending expert order, summed with index_add_
    exactly like transformers' eager loop (so float32 on the CPU matches it bit for bit)."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens, slots = order // k, order % k
    out = torch.zeros_like(x)
    begin = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok, slot = tokens[begin : begin + n], slots[begin : begin + n]
        begin += n
        out.index_add_(0, tok, (expert(x[tok], e) * weights[tok, slot, None]).to(out.dtype))
    return out


ROPE_TABLES_TO_LAYERS = os.environ.get("ERNIE_ROPE_ROWS", "kernel") != "graph"
# ERNIE_EXPERT_SUM=reduce weighs and adds a token's expert outputs as one sum over its slots, for comparison.
EXPERT_SUM_AS_ADDS = os.environ.get("ERNIE_EXPERT_SUM", "adds") != "reduce"


def run_selected(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up, down, down_takes_gate_up: bool = False) -> torch.Tensor:
    """One token through its k experts with kernels that take all k at once: gate_up(x [H], experts)
    -> [k, 2I] and down(h [k, I], experts) -> [k, H], each expert's rows read once. down_takes_gate_up:
    down is given [k, 2I] and forms silu(gate) * up itself."""
    experts = idx[0]
    gu = gate_up(x[0], experts)
    if not down_takes_gate_up:
        gate, up = gu.chunk(2, dim=-1)
        gu = (F.silu(gate) * up).contiguous()
    y = down(gu, experts)
    if not EXPERT_SUM_AS_ADDS:
        return (y * weights[0, :, None]).sum(0, keepdim=True).to(x.dtype)
    y, w = y.float(), weights[0].float()
    # k - 1 additions, not a sum over slots: Inductor turns a reduction into pointwise code only
    # below 8 items (config.unroll_reductions_threshold). With the shared experts in the stack a
    # token takes 8, so the sum was a kernel of its own in every MoE layer of the decode graph
    # (27 a bf16 step on the H200); as additions it joins the kernel of the residual add and the next norm.
    out = y[0] * w[0]
    for slot in range(1, y.shape[0]):
        out = out + y[slot] * w[slot]
    return out[None].to(x.dtype)


GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# ERNIE_SHARED_IN_EXPERTS=0 keeps the shared experts a separate MLP on CUDA too, for comparison.
SHARED_IN_EXPERTS = os.environ.get("ERNIE_SHARED_IN_EXPERTS", "1") != "0"


def run_grouped_mm(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Prefill on the GPU: all experts in two grouped GEMMs over expert-sorted tokens.

    No host sync, so Python can queue the next layers while the GPU works: each group's end offset
    is found by searching the sorted expert ids, where torch.bincount would read its maximum back to
    the host once a layer. The k outputs of a token are put back in slot order and weighed by one
    batched product (float32 sums, one rounding), not added with atomics into a zeroed output.
    gate_up [E, 2I, H], down [E, H, I]."""
    t, k = idx.shape
    experts, order = torch.sort(idx.flatten(), stable=True)
    ids = torch.arange(gate_up.shape[0], device=x.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, ids, right=True, out_int32=True)
    if gpu_grouped.usable(x):  # the gather, the SwiGLU and the return to slot order inside the products
        h = gpu_grouped.grouped(x, gate_up, offsets, swiglu=True, order=order, gather=k)
        by_slot = gpu_grouped.grouped(h, down, offsets, order=order).view(t, k, -1)
    else:
        gate, up = GROUPED_MM(x[order // k], gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
        by_slot = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)
    return torch.bmm(weights.to(by_slot.dtype).view(t, 1, k), by_slot).view(t, -1)


class MoE(nn.Module):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.moe_intermediate_size * cfg.num_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, shared, cfg.use_bias) if shared else None
        self.num_shared = cfg.num_shared_experts

    def fuse_shared_experts(self) -> None:
        """Make the shared experts more experts of the stack, which every token takes with weight 1.

        For the CUDA decode graph: the routed experts' two kernels then do the shared experts' work
        too, three kernels fewer a layer (the shared gate_up, its SwiGLU, its down). The shared MLP's
        intermediate size is num_shared times the experts', so it splits exactly: SwiGLU acts on
        each intermediate unit alone, and down sums over the units, so the parts' outputs add up to
        the MLP's. The sum is now in float32 with the routed ones (transformers adds the two in the
        activation dtype), so results move within rounding. The MLP's weights move into the stack
        and are not held twice."""
        if self.shared_experts is not None and self.experts.append_shared(self.shared_experts, self.num_shared):
            self.shared_experts, self.gate.always = None, self.num_shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        x = x.view(-1, h)
        weights, idx = self.gate(x)  # with the shared experts last where they sit in the stack
        out = self.experts(x, weights, idx)
        if self.shared_experts is not None:  # added after the routed sum, as transformers does
            out = out + self.shared_experts(x)
        return out.view(b, t, h)


# ---- §2.1 decoder layer and the whole model ---------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ErnieConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class ErnieForCausalLM(nn.Module):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Untied checkpoints get their own head; ERNIE 4.5 releases tie it to the embedding.
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq = 0
        self.quantization = None  # an ernie_cli.quant.spec.QuantSpec when the weights are int8/int4
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the norms' dtype: a quantized embedding holds no float weight)."""
        return self.norm.weight.dtype

    def setup_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Make room for max_seq positions. A big enough cache is kept, so a compiled decode step
        keeps its shapes; a new one is rounded up to whole blocks so few sizes ever exist."""
        cfg, device = self.config, self.device
        dtype = dtype or self.dtype
        cache = self.layers[0].self_attn.cache
        if cache is not None and cache.k.shape[0] == batch and cache.k.dtype == dtype and cache.capacity >= max_seq:
            return
        max_seq = -(-max_seq // CACHE_BLOCK) * CACHE_BLOCK
        for layer in self.layers:
            layer.self_attn.cache = KVCache(batch, cfg.num_key_value_heads, max_seq, cfg.head_dim, dtype, device)
        self.rope_cos, self.rope_sin = rope_table(cfg.head_dim, cfg.rope_theta, max_seq, device)
        self.max_seq = max_seq

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One new token per sequence at position pos (a one-element int64 device tensor) -> logits [B, V].

        No host syncs and no data-dependent shapes, so torch.compile can capture it in one CUDA graph.
        """
        # The layers get the whole RoPE tables; each attention takes the row at pos itself. Taken
        # here, Inductor copied the row once a layer for the attention operator (its
        # index_split kernels, 28 a step). ERNIE_ROPE_ROWS=graph takes the rows here, for comparison.
        cos, sin = (self.rope_cos, self.rope_sin) if ROPE_TABLES_TO_LAYERS else (self.rope_cos[pos], self.rope_sin[pos])
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, pos)
        return self.head(self.norm(x))[:, -1]

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits. Quantized head modules (ernie_cli.quant) bring their own `project`."""
        project = getattr(self.embed_tokens if self.lm_head is None else self.lm_head, "project", None)
        return project(x) if project is not None else linear(x, self.head_weight())

    def prefill_waits_for_host(self) -> bool:
        """Whether a prompt's forward reads anything back to the host, so that no CUDA graph can
        hold it. Only the routed experts do: one GEMM per expert (run_grouped) reads the group
        sizes back, and so does torch's grouped GEMM before Hopper (a fallback); on Hopper it keeps
        the offsets on the GPU. The rest of the forward has no host sync (docs/performance.md)."""
        experts = [layer.mlp.experts for layer in self.layers if isinstance(layer.mlp, MoE)]
        if not experts:
            return False
        device = self.device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
            return True
        probe = torch.empty(0, dtype=self.dtype, device=device)
        return not all(e.uses_grouped_mm(probe) for e in experts)

    def fuse_projections(self) -> None:
        """Fewer, larger matrices for the decode graph (see Attention.fuse_qkv; on CUDA also
        MoE.fuse_shared_experts, which moves results within rounding, so the CPU, where float32
        matches transformers bit for bit, keeps the shared MLP)."""
        for layer in self.layers:
            layer.self_attn.fuse_qkv()
            if self.device.type == "cuda" and SHARED_IN_EXPERTS and isinstance(layer.mlp, MoE):
                layer.mlp.fuse_shared_experts()
                # The grown stack cannot reuse the old one's freed block; without this, every
                # layer's old stack would stay reserved and the experts would be held twice.
                torch.cuda.empty_cache()

    def forward(self, tokens: torch.Tensor, start: int = 0, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 -> logits [B, T or 1, V] (the last position unless all_logits)."""
        t = tokens.shape[1]
        if start + t > self.max_seq:
            if start:
                raise ValueError(f"positions up to {start + t} exceed the cache of {self.max_seq}")
            self.setup_cache(tokens.shape[0], t)  # a one-off full forward sizes its own cache
        x = self._layers(tokens, start)
        if not all_logits:
            x = x[:, -1:]
        return self.head(self.norm(x))

    def _layers(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        t = tokens.shape[1]
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return x

    def prefill_at(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A prompt padded at its end, tokens [B, T] from position 0 -> logits [B, V] at position
        `last` (a one-element device tensor): the real prompt's last token.

        For the prefill CUDA graphs (generate.PrefillGraphs), which replay one length per graph.
        The padding changes nothing before it: attention is causal and every other operation is
        per token. It fills cache slots past the prompt, which decoding overwrites before it reads
        them. The cache must hold T positions."""
        x = self._layers(tokens, 0).index_select(1, last)
        return self.head(self.norm(x))[:, -1]
