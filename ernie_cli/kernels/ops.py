"""The one door between the model and its kernels.

The model (ernie_cli/model/ernie.py) states the arithmetic; every operation it needs that has more
than one implementation is called here: rms_norm, rope, linear, embed, attention, route, experts,
and all_reduce (the sum of a layer's partial outputs over the ranks of a model split over several
processes). Each picks torch, a Triton kernel (kernels/triton/) or the native CPU code
(kernels/cpu/) from what it is given: the device, the dtype, the number of tokens, whether torch.compile is tracing, and the
weight's type (a float tensor or a quant.weight.QuantWeight in one of three layouts). Under
torch.compile those are constants of the trace, so a compiled step holds only the chosen branch.

This is the only module that reads kernel switches:
- ERNIE_TRITON=0 keeps every CUDA operation in torch's own kernels (and Inductor's);
- ERNIE_NATIVE=0 keeps the CPU's quantized products in torch's int kernels and its bf16 products in
  torch's matmul (read by kernels/cpu/native.py when it decides whether to build, through
  native_enabled() here).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ernie_cli.kernels import quantized
from ernie_cli.kernels.cpu import native, widened
from ernie_cli.kernels.quantized import QuantWeight
from ernie_cli.kernels.triton import attention as triton_attention
from ernie_cli.kernels.triton import elementwise as triton_elementwise
from ernie_cli.kernels.triton import gemv as triton_gemv
from ernie_cli.kernels.triton import grouped as triton_grouped
from ernie_cli.kernels.triton import paged as triton_paged
from ernie_cli.kernels.triton import router as triton_router
from ernie_cli.kernels.triton.gemv import triton
from ernie_cli.model.cache import PagedDecode, Ragged
from ernie_cli.parallel import group as parallel

TRITON = triton is not None and os.environ.get("ERNIE_TRITON", "1") != "0"
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def native_enabled() -> bool:
    return os.environ.get("ERNIE_NATIVE", "1") != "0"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _eager_triton(x: torch.Tensor) -> bool:
    """Triton for eager CUDA work (Inductor fuses the same work itself inside a compiled step)."""
    return TRITON and x.is_cuda and not _compiling()


def _gemv_takes(x: torch.Tensor, w) -> bool:
    """Whether one token's product with w goes through the Triton GEMVs."""
    if not (TRITON and x.is_cuda and x.reshape(-1, x.shape[-1]).shape[0] == 1):
        return False
    if isinstance(w, QuantWeight):
        return w.backend == "dequant" and triton_gemv.takes(w.fmt, w.group_size)
    return True


def _native_bf16(x: torch.Tensor, w) -> bool:
    """Whether one token's product with a bf16 weight goes through the native bf16 GEMV: where this
    CPU's build has one (AVX512_BF16's VDPBF16PS, or AVX2's shift to float32 and FMA), as oneDNN's
    M=1 matmul reads the weights at well below the DRAM rate (docs/performance.md). Compiled steps
    keep torch's (the kernel is a ctypes call)."""
    if not (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16
            and x.device.type == "cpu" and w.device.type == "cpu" and x.reshape(-1, x.shape[-1]).shape[0] == 1
            and w.is_contiguous() and not _compiling() and native_enabled()):
        return False
    kern = native.kernels()
    return kern is not None and kern.has_bf16


def _native_small(x: torch.Tensor):
    """The native kernels, where bf16 work on the CPU runs eagerly and they built; else None. Their
    one-call norm, attention and router replace torch calls that cost a bf16 decode step about a
    millisecond a layer (docs/performance.md)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or _compiling() or not native_enabled():
        return None
    return native.kernels()


# ---- §2.2 RMSNorm -------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _eager_triton(x):
        return triton_elementwise.rms_norm(x, weight, eps)
    kern = _native_small(x)
    if kern is not None and weight.dtype == torch.bfloat16 and weight.is_contiguous():
        return kern.rms_norm(x.contiguous(), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)  # weight applied after the cast back, as transformers does


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream x + delta, and its RMSNorm: one kernel on CUDA, bit for bit the addition
    and the norm done one after the other (delta None: x itself and its norm)."""
    if delta is None:
        return x, rms_norm(x, weight, eps)
    if isinstance(delta, Mixture):
        return triton_elementwise.add_mixture_rms_norm(x, delta.outputs, delta.weights, weight, eps)
    if _eager_triton(x) and delta.dtype == x.dtype and delta.shape == x.shape:
        return triton_elementwise.add_rms_norm(x, delta, weight, eps)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def finite_and_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [2, B]: 1 where a row is all finite (else 0), and each row's argmax:
    what a batch step reads back to learn whether a row went bad and the greedy rows' tokens."""
    if _eager_triton(logits):
        return triton_elementwise.argmax_finite(logits)
    return torch.stack([torch.isfinite(logits).all(dim=-1).long(), logits.argmax(dim=-1)])


# ---- §2.3 rotary embedding (interleaved pairs) -----------------------------------------------------


def _rotate_pairs(t: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotates adjacent pairs, not halves."""
    return torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [B, T, heads, d]; cos/sin [T, d] fp32, interleaved. fp32 math, result cast back (three roundings)."""
    if t.shape[0] == 1 and _eager_triton(t):  # one kernel per tensor instead of eight
        return triton_elementwise.rope(t[0], cos, sin)[None]
    return rope_in_torch(t, cos, sin)


def rope_in_torch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c, s = cos[:, None, :], sin[:, None, :]
    return (t.float() * c + _rotate_pairs(t).float() * s).to(t.dtype)


# ---- linear products and the embedding ----------------------------------------------------------------


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight.T (+ bias). weight: a float tensor [out, in] or a QuantWeight.

    One token on CUDA goes through the Triton GEMVs: inside the decode graph on the H200, cuBLAS's
    GEMV kernels read a layer's 2.6–31 MB matrices at about 1.9 TB/s and the tied head at 4.1, the
    Triton kernel at 2.3–3.9 and 4.4 (docs/performance.md)."""
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(weight, QuantWeight):
        if _gemv_takes(flat, weight):
            y = quantized.gemv(weight, flat[0])
        else:
            y = quantized.matmul(weight, flat, gpu_dequant=_eager_triton(flat))
    elif _gemv_takes(flat, weight):
        y = triton_gemv.gemv("float", flat[0], weight)
    elif _native_bf16(flat, weight):
        y = native.kernels().bf16_gemv(weight, flat[0].contiguous())
    elif widened.takes(flat, weight):
        y = widened.linear(flat, weight)
    else:
        return F.linear(x, weight, bias)
    y = y.view(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def embed(tokens: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, QuantWeight):
        return quantized.embed(weight, tokens, dtype)
    return F.embedding(tokens, weight)


# ---- §2.3 attention with its KV cache ------------------------------------------------------------------


def attention(q, k, v, cache_k, cache_v, cos, sin, start, scale: float) -> torch.Tensor:
    """Causal GQA attention of T new tokens, RoPE applied here so that the decode kernel can rotate,
    write the cache and attend in one pass.

    q [B, T, H, d], k/v [B, T, KV, d] as projected (not rotated). start: the first position, an int
    (eager), or a one-element device tensor (the decode graph: T == 1). cos/sin: the RoPE rows of
    positions start..start+T-1 (eager), or the whole tables (decode graph). Writes the new keys and
    values into cache_k/cache_v [B, KV, S, d] and returns [B, T, H * d].

    start may also be a batch of several sequences in a paged cache: a Ragged one (see
    ragged_attention) or one new token each (see paged_decode_attention)."""
    if isinstance(start, Ragged):
        return ragged_attention(q, k, v, cache_k, cache_v, cos, sin, start, scale)
    if isinstance(start, PagedDecode):
        return paged_decode_attention(q, k, v, cache_k, cache_v, cos, sin, start, scale)
    b, t = q.shape[:2]
    if isinstance(start, torch.Tensor):
        if TRITON and triton_attention.usable(q.transpose(1, 2), cache_k):
            out = triton_attention.rotate_write_decode(q, k, v, cache_k, cache_v, cos, sin, start, scale)
            return out.transpose(1, 2).reshape(b, t, -1)
        cos, sin = cos[start], sin[start]
        q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
        cache_k.index_copy_(2, start, k)
        cache_v.index_copy_(2, start, v.transpose(1, 2))
        # static shapes for the CUDA graph: attend over the whole buffer, masking unfilled slots
        mask = (torch.arange(cache_k.shape[2], device=q.device) <= start)[None, :]
        out = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1)
    kern = _native_small(q) if b == t == 1 else None
    if kern is not None and cache_k.dtype == torch.bfloat16 and cache_k.is_contiguous() and cache_v.is_contiguous() and q.shape[-1] <= 1024:
        out = kern.decode_attention(q[0, 0].contiguous(), k[0, 0].contiguous(), v[0, 0].contiguous(), cache_k[0], cache_v[0],
                                    cos[0].contiguous(), sin[0].contiguous(), start, scale)
        return out.view(1, 1, -1)
    q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)
    end = start + t
    cache_k[:, :, start:end] = k
    cache_v[:, :, start:end] = v.transpose(1, 2)
    k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # only the filled part is read
    if t == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        # One new token, bf16 on the CPU: torch's kernel took 130 µs a layer on [B, H, 1, d] queries
        # at 64 cached positions (1.9 ms at 1,024) and 23 µs (157) on the same work posed as the G
        # query heads of each KV head attending to that head's keys, [B, KV, G, d]: the same sums.
        # (float32 keeps the form transformers' parity is measured on.)
        kv_heads = k.shape[1]
        grouped = q.reshape(b, kv_heads, q.shape[1] // kv_heads, q.shape[-1])
        out = F.scaled_dot_product_attention(grouped, k, v, scale=scale)
        return out.reshape(b, t, -1)
    if t == 1:
        mask, causal = None, False  # the one new query sees every cached key
    elif start == 0:
        mask, causal = None, True
    else:  # a chunk appended to a filled cache: query i sees keys j <= start + i
        rows = torch.arange(t, device=q.device)[:, None] + start
        mask, causal = torch.arange(end, device=q.device)[None, :] <= rows, False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, t, -1)


def ragged_attention(q, k, v, cache_k, cache_v, cos, sin, batch: Ragged, scale: float) -> torch.Tensor:
    """Several sequences packed in one row: q [1, N, H, d], k/v [1, N, KV, d]; cos/sin the whole RoPE
    tables. The first G tokens, one of each decoding sequence (batch.decode), take
    paged_decode_attention; every other token's key and value go to its slot of the paged cache
    (cache_k/cache_v [slots, KV, d]), then each prompt chunk attends over its own slots, causally,
    with the same masks as one sequence alone. Every other operation of the forward runs once over
    all N tokens (so each selected expert's weights are read once per step for all the tokens routed
    to it). On CUDA in 16 bits one Triton kernel attends for every chunk (kernels/triton/paged.py);
    elsewhere a loop over the chunks does, one SDPA each."""
    outs, g = [], 0
    if batch.decode is not None:
        g = batch.decode.positions.shape[0]
        outs.append(paged_decode_attention(q[:, :g], k[:, :g], v[:, :g], cache_k, cache_v, cos, sin, batch.decode, scale)[0])
    c, s = cos[batch.positions], sin[batch.positions]
    q, k = rope(q[:, g:], c, s)[0], rope(k[:, g:], c, s)[0]
    cache_k.index_copy_(0, batch.slots, k)
    cache_v.index_copy_(0, batch.slots, v[0, g:])
    if batch.chunks is not None and _eager_triton(q) and triton_paged.usable(q[None], cache_k) and q.is_contiguous():
        outs.append(triton_paged.prefill(q, cache_k, cache_v, batch.chunks, scale))
        return torch.cat(outs)[None] if len(outs) > 1 else outs[0][None]
    for offset, t, start, slots in batch.spans:
        keys = cache_k.index_select(0, slots).transpose(0, 1)[None]  # [1, KV, end, d]
        values = cache_v.index_select(0, slots).transpose(0, 1)[None]
        query = q[offset : offset + t].transpose(0, 1)[None]  # [1, H, t, d]
        end = start + t
        if t == 1:
            mask, causal = None, False
        elif start == 0:
            mask, causal = None, True
        else:
            rows = torch.arange(t, device=q.device)[:, None] + start
            mask, causal = torch.arange(end, device=q.device)[None, :] <= rows, False
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        outs.append(out[0].transpose(0, 1).reshape(t, -1))
    return torch.cat(outs)[None]


def paged_decode_attention(q, k, v, cache_k, cache_v, cos, sin, batch: PagedDecode, scale: float) -> torch.Tensor:
    """One new token of each of B sequences: q [1, B, H, d], k/v [1, B, KV, d] as projected; cos/sin
    the whole RoPE tables. Each key and value goes to its slot, then each token attends over the
    blocks of its sequence's table up to its position. Static shapes, no host sync: the batch's
    decode graph holds it. Elsewhere than the Triton kernel, every sequence's blocks are gathered to
    the batch's longest and the rest masked, one SDPA for the batch."""
    if _eager_triton(q) and triton_paged.usable(q, cache_k):
        return triton_paged.decode(q, k, v, cache_k, cache_v, cos, sin, batch, scale)
    b, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    c, s = cos[batch.positions], sin[batch.positions]
    q, k = rope(q, c, s)[0], rope(k, c, s)[0]
    cache_k.index_copy_(0, batch.slots, k)
    cache_v.index_copy_(0, batch.slots, v[0])
    table = batch.table.long()
    slots = (table[:, :, None] * batch.block + torch.arange(batch.block, device=table.device)).flatten(1)  # [B, L]
    keys = cache_k[slots].permute(0, 2, 1, 3)  # [B, KV, L, d]
    values = cache_v[slots].permute(0, 2, 1, 3)
    mask = torch.arange(slots.shape[1], device=q.device)[None, :] <= batch.positions[:, None]
    query = q[:, :, None, :]  # [B, H, 1, d]
    if q.device.type == "cpu" and q.dtype != torch.float32:  # as attention() poses one bf16 token on the CPU
        grouped_q = query.reshape(b, kv_heads, heads // kv_heads, q.shape[-1])
        out = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=mask[:, None, None, :], scale=scale)
    else:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
    return out.reshape(1, b, -1)


# ---- the sum over the ranks of a split model ---------------------------------------------------------


def all_reduce(x: torch.Tensor, group: parallel.Group) -> torch.Tensor:
    """This rank's partial output of a block summed with the other ranks' (in place); in one process
    x itself, untouched, so that a model that is not split computes exactly what it always did."""
    if group.world == 1:
        return x
    return parallel.all_reduce(summed(x).contiguous())


# ---- §2.5 the router -----------------------------------------------------------------------------------


def logits_as_sum(x: torch.Tensor) -> bool:
    """One token on CUDA inside torch.compile: F.linear's float32 [1, H] x [H, E] was two cuBLAS
    kernels a layer (a dot and a reduce, 3.8 µs on the H200); as a product and a sum Inductor makes
    one kernel with the cast in it."""
    return x.is_cuda and x.shape[0] == 1 and _compiling()


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, norm_min: float,
          always: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax router; the correction bias chooses experts but does not weigh them. `always`
    experts after the routed ones (the shared experts moved into the stack) are taken at weight 1."""
    kern = _native_small(x) if x.shape[0] == 1 else None
    if kern is not None and top_k <= weight.shape[0] <= 1024 and weight.dtype == bias.dtype == torch.float32 and weight.is_contiguous():
        return kern.route(x[0].contiguous(), weight, bias.contiguous(), top_k, norm_min, always)
    if logits_as_sum(x):
        logits = (x.float()[:, None, :] * weight).sum(-1)
    elif _eager_triton(x) and x.shape[0] == 1:
        # One kernel where torch takes three (the cast to float32, cuBLAS's dot and its reduce), in the
        # decode step captured from the eager code. A fixed block (the tuner would time this shape in
        # a first run), one row a program and all of K in one load: with 64 rows, four rows a program
        # left 16 programs walking K in five dependent loads, 2.65 µs a call against 1.29, and the
        # whole step 8% slower for int4 and 4.5% for bf16 on an H200 (docs/performance.md).
        block = (1, min(triton.next_power_of_2(x.shape[-1]), 8192))
        logits = triton_gemv.gemv("float", x[0], weight, block=block, out_dtype=torch.float32)
    else:
        logits = F.linear(x.float(), weight)
    if TRITON and logits.is_cuda:
        return triton_router.route(logits, bias, top_k, norm_min, x.dtype, always)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    _, idx = torch.topk(probs + bias, top_k, dim=-1)
    weights = probs.gather(-1, idx)
    weights = (weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)).to(x.dtype)
    if always:
        fixed = torch.arange(logits.shape[-1], logits.shape[-1] + always, device=idx.device)
        idx = torch.cat([idx, fixed.expand(idx.shape[0], -1)], 1)
        weights = torch.cat([weights, weights.new_ones(idx.shape[0], always)], 1)
    return weights, idx


# ---- §2.5 the routed experts -----------------------------------------------------------------------------
#
# One strategy set for float and quantized stacks (gate_up [E, 2I, H], gate rows first; down [E, H, I]):
# - selected: one token through its k experts with kernels that take all k at once (Triton GEMVs on
#   CUDA, the native kernels on the CPU), each expert's rows read once; no host sync, graph-safe;
# - gathered: the k experts' weights gathered by index, then batched products; compiled, written as
#   multiply-and-sum so Inductor fuses the gather (and any dequantization) into the reduction;
# - grouped_mm: many tokens on CUDA in bf16, all experts in two grouped GEMMs without a host sync;
# - grouped: one GEMM per selected expert in ascending expert order, summed with index_add_ exactly
#   like transformers' eager loop (float32 on the CPU matches it bit for bit).


def experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up, down,
            owned: range | None = None) -> torch.Tensor | Mixture:
    """x [T, H], the router's weights and expert ids [T, k] -> the weighted sum of the experts' outputs
    (one token eagerly on CUDA: a Mixture, summed by the residual addition after the block).

    owned: the expert ids the stacks hold, where they hold only some (one rank of a split model);
    the sum is then over the slots routed to those experts alone."""
    if owned is not None:
        return owned_experts(x, weights, idx, gate_up, down, owned)
    quant = isinstance(gate_up, QuantWeight)
    if x.shape[0] == 1:
        backends = {gate_up.backend, down.backend} if quant else {"float"}
        if backends == {"native"}:
            return run_selected(x, weights, idx, quantized.selected_native(gate_up), quantized.selected_native(down, per_expert_x=True))
        if _gemv_takes(x, gate_up) and _gemv_takes(x, down):
            if quant:
                return run_selected(x, weights, idx, quantized.selected_gemv(gate_up), quantized.selected_gemv(down, per_expert_x=True, swiglu=True), True)
            # Float weights: silu(gate) * up inside the down product saves the eager step two kernels;
            # Inductor fuses it itself, and its compiled step was 8% slower with it in the product.
            eager = not _compiling()
            return run_selected(
                x, weights, idx,
                lambda v, e: triton_gemv.gemv("float", v, gate_up, experts=e),
                lambda h, e: triton_gemv.gemv("float", h, down, experts=e, per_expert_x=True, swiglu=eager), eager,
            )
        if "cpu" in backends:  # torch's int kernels take one matrix at a time
            return selected_one_by_one(x, weights, idx, gate_up, down)
        if _native_bf16(x, gate_up) and _native_bf16(x, down):
            kern = native.kernels()
            return run_selected(
                x, weights, idx,
                lambda v, e: kern.bf16_gemv(gate_up, v.contiguous(), e.contiguous()),
                lambda h, e: kern.bf16_gemv(down, h, e.contiguous(), per_expert_x=True, out_dtype=torch.float32),
            )
        if x.device.type != "cpu" or _compiling() or quant:
            return gathered(x, weights, idx, gate_up, down)
        # float on the CPU, eagerly: touching the k experts through views beats gathering copies
    if quant and gate_up.backend == down.backend == "native" and x.shape[0] <= PAIRS_TOKENS and not _compiling():
        return native_pairs(x, weights, idx, gate_up, down)
    if uses_grouped_mm(x, gate_up, down):
        return grouped_mm(x, weights, idx, gate_up, down)
    return grouped(x, weights, idx, gate_up, down)


# Up to this many tokens (a server's decode batch), the CPU's quantized experts take native_pairs.
PAIRS_TOKENS = 8


def native_pairs(x, weights, idx, gate_up, down) -> torch.Tensor:
    """A few tokens through their experts on the CPU's native kernels: every (token, expert) pair in
    one call for gate_up and one for down, the pairs sorted by expert so that an expert two tokens
    share is read twice in a row (the second time from cache). One GEMM per selected expert
    (`grouped`) cost some ten torch calls an expert, at 10-20 µs of Python each on a small CPU."""
    t, k = idx.shape
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    experts, tokens = flat[order].contiguous(), order // k
    xs = quantized.native_input(x)[tokens][:, None].contiguous()  # [P, 1, H]
    gate, up = quantized.native_mm(gate_up, xs, experts, per_expert_x=True)[:, 0].chunk(2, dim=-1)
    h = (F.silu(gate) * up)[:, None].contiguous()
    y = quantized.native_mm(down, h, experts, per_expert_x=True, out_dtype=torch.float32)[:, 0]  # [P, H]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32)
    out.index_add_(0, tokens, y * weights.flatten()[order].float()[:, None])
    return out.to(x.dtype)


def grouped(x, weights, idx, gate_up, down) -> torch.Tensor:
    return run_grouped(lambda h, e: _expert(h, e, gate_up, down), gate_up.shape[0], x, weights, idx)


def owned_experts(x, weights, idx, gate_up, down, owned: range) -> torch.Tensor:
    """Expert parallel: each held expert once over the tokens routed to it, as `grouped` does; a
    slot routed to another rank's expert gets the id one past the stack, which run_grouped skips.
    One GEMM per expert and one host sync on every device: the graph-safe one-token kernels
    (`selected`, `gathered`) take every slot's expert from the stack and are not used here."""
    mine = (idx >= owned.start) & (idx < owned.stop)
    local = torch.where(mine, idx - owned.start, len(owned))
    return run_grouped(lambda h, e: _expert(h, e, gate_up, down), len(owned), x, weights, local)


def grouped_mm(x, weights, idx, gate_up, down) -> torch.Tensor:
    return run_grouped_mm(x, weights, idx, quantized.float_stack(gate_up, x.dtype), quantized.float_stack(down, x.dtype))


def uses_grouped_mm(x: torch.Tensor, gate_up, down) -> bool:
    """Whether many tokens like x take the two grouped GEMMs (else one GEMM per expert)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and GROUPED_MM is not None):
        return False
    if isinstance(gate_up, QuantWeight):  # expanded to floats first, by the Triton dequantizer
        return TRITON and gate_up.backend == down.backend == "dequant"
    return True


def _expert_product(h: torch.Tensor, w, e) -> torch.Tensor:
    if isinstance(w, QuantWeight):
        return quantized.matmul(w, h, e, gpu_dequant=_eager_triton(h))
    if widened.takes(h, w):
        return widened.linear(h, w[e])
    return F.linear(h, w[e])


def _expert(x: torch.Tensor, e, gate_up, down) -> torch.Tensor:
    gate, up = _expert_product(x, gate_up, e).chunk(2, dim=-1)
    return _expert_product(F.silu(gate) * up, down, e)


def selected_one_by_one(x, weights, idx, gate_up, down) -> torch.Tensor:
    """One token, one int-kernel product per selected expert (torch's CPU int kernels)."""
    out = torch.zeros_like(x)
    if _compiling():  # experts picked by 0-d tensor indices, no Python list
        for slot in range(idx.shape[1]):
            out = out + _expert(x, idx[0, slot], gate_up, down) * weights[0, slot]
        return out
    chosen = idx[0].tolist()  # a CPU tensor: no device sync; int indices take views, not copies
    for slot in sorted(range(len(chosen)), key=chosen.__getitem__):  # ascending experts, as grouped sums
        out += _expert(x, chosen[slot], gate_up, down) * weights[0, slot]
    return out


def gathered(x, weights, idx, gate_up, down) -> torch.Tensor:
    """Graph-safe: gather (and dequantize) the k selected experts of each token, then batched GEMVs.
    Compiled, multiply-and-sum lets Inductor fuse the gather into the reduction (each selected
    expert read once); eagerly, einsum avoids the big product temporary."""
    w1, w2 = quantized.gather(gate_up, idx, x.dtype), quantized.gather(down, idx, x.dtype)
    if _compiling():
        gate, up = (w1 * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)
        y = (w2 * (F.silu(gate) * up)[:, :, None, :]).sum(-1)
    else:
        gate, up = torch.einsum("nh,nkoh->nko", x, w1).chunk(2, dim=-1)
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, w2)
    return (y * weights[..., None]).sum(1)


def run_grouped(expert, num_experts: int, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One GEMM per selected expert (expert(x_e, e)), in ascending expert order, summed with index_add_
    exactly like transformers' eager loop."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens, slots = order // k, order % k
    out = torch.zeros_like(x)
    begin = 0
    for e, n in enumerate(counts[:num_experts]):  # ids past the stack (other ranks' slots) sort last and are skipped
        if n == 0:
            continue
        tok, slot = tokens[begin : begin + n], slots[begin : begin + n]
        begin += n
        out.index_add_(0, tok, (expert(x[tok], e) * weights[tok, slot, None]).to(out.dtype))
    return out


class Mixture(NamedTuple):
    """One token's k expert outputs [k, H] and their router weights [k], not yet summed. Made in the
    eager (and captured) decode step on CUDA, where the residual addition after the MoE block sums
    them in its own kernel (add_rms_norm): as a kernel of its own, the weighted sum cost the step a
    dependent launch, a few microseconds, in every MoE layer (docs/performance.md)."""

    outputs: torch.Tensor
    weights: torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...] = (1, -1)

    def view(self, *shape: int) -> Mixture:
        return self._replace(shape=shape)


def summed(x: torch.Tensor | Mixture) -> torch.Tensor:
    """x itself, or a Mixture's weighted sum in its own kernel (where something else than the
    residual addition takes it: the ranks' all-reduce, the shared experts outside the stack)."""
    if isinstance(x, Mixture):
        return triton_elementwise.weighted_sum(x.outputs, x.weights, x.dtype).view(x.shape)
    return x


def run_selected(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up, down,
                 down_takes_gate_up: bool = False) -> torch.Tensor | Mixture:
    """One token through its k experts: gate_up(x [H], experts) -> [k, 2I] and down(h [k, I], experts)
    -> [k, H]. down_takes_gate_up: down is given [k, 2I] and forms silu(gate) * up itself. Eagerly
    on CUDA the outputs are left unsummed (a Mixture)."""
    experts = idx[0]
    gu = gate_up(x[0], experts)
    if not down_takes_gate_up:
        gate, up = gu.chunk(2, dim=-1)
        gu = (F.silu(gate) * up).contiguous()
    y = down(gu, experts)
    if y.is_cuda and not _compiling():
        # Eagerly (and in the captured decode graph) no kernel here: the additions below are 2k - 1
        # kernels of a few microseconds each, which Inductor fuses but an eager step pays.
        return Mixture(y, weights[0], x.dtype)
    y, w = y.float(), weights[0].float()
    if not _compiling():
        # Eagerly on the CPU one product: the additions below are some twenty torch calls, at about
        # 10 µs of Python each on a small CPU (a token's decode layer is a few ms).
        return (w @ y)[None].to(x.dtype)
    # k - 1 additions, not a sum over slots: Inductor turns a reduction into pointwise code only
    # below 8 items, and with the shared experts in the stack a token takes 8; as additions the sum
    # joins the kernel of the residual add and the next norm instead of being a kernel of its own.
    out = y[0] * w[0]
    for slot in range(1, y.shape[0]):
        out = out + y[slot] * w[slot]
    return out[None].to(x.dtype)


def run_grouped_mm(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Prefill on the GPU: all experts in two grouped GEMMs over expert-sorted tokens.

    No host sync, so Python can queue the next layers while the GPU works: each group's end offset
    is found by searching the sorted expert ids, where torch.bincount would read its maximum back to
    the host once a layer. The k outputs of a token are put back in slot order and weighed by one
    batched product (float32 sums, one rounding), not added with atomics into a zeroed output."""
    t, k = idx.shape
    experts_sorted, order = torch.sort(idx.flatten(), stable=True)
    ids = torch.arange(gate_up.shape[0], device=x.device, dtype=experts_sorted.dtype)
    offsets = torch.searchsorted(experts_sorted, ids, right=True, out_int32=True)
    if TRITON and triton_grouped.usable(x):
        # the gather, the SwiGLU and the return to slot order inside the products
        h = triton_grouped.grouped(x, gate_up, offsets, swiglu=True, order=order, gather=k)
        by_slot = triton_grouped.grouped(h, down, offsets, order=order).view(t, k, -1)
    else:
        gate, up = GROUPED_MM(x[order // k], gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = GROUPED_MM(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
        by_slot = torch.empty_like(y).index_copy_(0, order, y).view(t, k, -1)
    return torch.bmm(weights.to(by_slot.dtype).view(t, 1, k), by_slot).view(t, -1)


def prefill_waits_for_host(device: torch.device, dtype: torch.dtype, expert_stacks) -> bool:
    """Whether a prompt's forward reads anything back to the host, so that no CUDA graph can hold
    it. Only the routed experts do: one GEMM per expert reads the group sizes back, and so does
    torch's grouped GEMM before Hopper; on Hopper it keeps the offsets on the GPU."""
    stacks = list(expert_stacks)
    if not stacks:
        return False
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return True
    probe = torch.empty(0, dtype=dtype, device=device)
    return not all(uses_grouped_mm(probe, gate_up, down) for gate_up, down in stacks)


# ---- the layout of a quantized weight -----------------------------------------------------------------

CPU_INT4_GROUPS = (32, 64, 128, 256)
# Tests set "cpu" or "dequant" to run those layouts on the CPU ("dequant" is the code CUDA runs).
FORCED_QUANT_BACKEND = ""


def choose_backend(fmt: str, group_size: int, device: torch.device, in_features: int) -> str:
    """"native" on the CPU where its kernels build and the shape suits them, else "cpu" (torch's int
    kernels) where they apply, else "dequant" (the layout CUDA uses)."""
    forced = FORCED_QUANT_BACKEND
    if device.type != "cpu" or forced == "dequant":
        return "dequant"
    fits_native = in_features % native.BLOCK == 0 and in_features <= native.MAX_IN_FEATURES and (fmt == "int8" or group_size % native.BLOCK == 0)
    if forced != "cpu" and fits_native and native_enabled() and native.kernels() is not None:
        return "native"
    if fmt == "int8" or group_size in CPU_INT4_GROUPS:
        return "cpu"
    return "dequant"
