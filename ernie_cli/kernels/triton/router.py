"""The MoE router's tail on CUDA as one Triton kernel: softmax, bias, top-k, gather, renormalise.

Why: written in torch, the tail after the router's logits was five kernels a layer on the H200
(three Inductor kernels and torch.topk's two, about 13 µs of a 136 µs decode layer), for 64 numbers
per token. One program per token does it all in registers.

Same arithmetic as model.Router: probabilities in float32, experts chosen by probability plus the
correction bias, weighted by the unbiased probabilities divided by max(sum, norm_min). Experts come
out in descending score order, ties to the lower index.
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import overlap
from ernie_cli.kernels.triton.gemv import tl, triton

if triton is not None:
    from ernie_cli.kernels.triton.overlap import wait_for_inputs  # a module name: gemv.py says why

    @triton.jit
    def _route(logits_ptr, bias_ptr, w_ptr, idx_ptr, E, norm_min, K: tl.constexpr, ALWAYS: tl.constexpr,
               BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        ok = e < E
        logits = tl.load(logits_ptr + row * E + e, mask=ok, other=float("-inf"))
        ex = tl.where(ok, tl.exp(logits - tl.max(logits, 0)), 0.0)
        probs = ex / tl.sum(ex, 0)
        score = tl.where(ok, probs + tl.load(bias_ptr + e, mask=ok, other=0.0), float("-inf"))
        slots = tl.arange(0, BLOCK_K)
        chosen = tl.zeros((BLOCK_K,), tl.int32)
        weights = tl.zeros((BLOCK_K,), tl.float32)
        for i in tl.static_range(K):
            best = tl.max(score, 0)
            j = tl.min(tl.where(score == best, e, BLOCK_E), 0)
            chosen = tl.where(slots == i, j, chosen)
            weights = tl.where(slots == i, tl.sum(tl.where(e == j, probs, 0.0), 0), weights)
            score = tl.where(e == j, float("-inf"), score)
        weights = weights / tl.maximum(tl.sum(weights, 0), norm_min)
        fixed = slots >= K  # the ALWAYS experts after the routed ones, E, E+1, ..., at weight 1
        chosen = tl.where(fixed, E + slots - K, chosen)
        weights = tl.where(fixed, 1.0, weights)
        tl.store(w_ptr + row * (K + ALWAYS) + slots, weights.to(w_ptr.dtype.element_ty), mask=slots < K + ALWAYS)
        tl.store(idx_ptr + row * (K + ALWAYS) + slots, chosen.to(tl.int64), mask=slots < K + ALWAYS)


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, norm_min: float, dtype: torch.dtype,
          always: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [T, E] -> (weights [T, k + always] in dtype, expert ids int64 [T, k + always]).
    always: experts E .. E+always-1 follow the chosen k in every row, at weight 1 (the shared experts
    when they sit in the routed stack, model.MoE.fuse_shared_experts), written here so the decode
    graph needs no kernel to append them."""
    logits = logits.contiguous()
    t, e = logits.shape
    weights = torch.empty((t, top_k + always), dtype=dtype, device=logits.device)
    idx = torch.empty((t, top_k + always), dtype=torch.int64, device=logits.device)
    # One warp: 64 experts fit in its 32 threads, so every max, min and sum of the top-k loop is a
    # shuffle. With the default four warps, sm_90 code had 59 barriers for the same work.
    _route[(t,)](
        logits, bias, weights, idx, e, norm_min,
        K=top_k, ALWAYS=always, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k + always),
        num_warps=1,  # one warp: no barriers in its top-k loop
        **overlap.launch_args(logits),
    )
    return weights, idx
