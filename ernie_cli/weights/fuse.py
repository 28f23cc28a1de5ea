"""Fewer, larger matrices for the one-token step, made by the loader before the model is used.

Each fusion trades nothing in exactness that a test does not bound: q, k and v as one matrix give
the same products; the shared experts as more experts of the stack move results within rounding
(their sum is in float32 with the routed experts', where transformers adds the two in the
activation dtype), so that one is made on CUDA only, and the CPU, where float32 matches
transformers bit for bit, keeps the shared MLP.
"""

from __future__ import annotations

import torch

from ernie_cli.model.ernie import Attention, ErnieForCausalLM, Linear, MoE, set_weight
from ernie_cli.quant.weight import QuantWeight


def fuse_for_decode(model: ErnieForCausalLM) -> ErnieForCausalLM:
    for layer in model.layers:
        fuse_qkv(layer.self_attn)
        if model.device.type == "cuda" and isinstance(layer.mlp, MoE):
            shared_into_experts(layer.mlp)
            # The grown stack cannot reuse the old one's freed block; without this, every layer's
            # old stack would stay reserved and the experts would be held twice.
            torch.cuda.empty_cache()
    return model


def _concatenated(parts: list[Linear]) -> Linear | None:
    weights = [p.weight for p in parts]
    biases = [p.bias for p in parts]
    if any((b is None) != (biases[0] is None) for b in biases):
        return None
    if all(isinstance(w, QuantWeight) for w in weights):
        weight = QuantWeight.concatenate(weights)
        if weight is None:
            return None
    elif all(isinstance(w, torch.Tensor) and w.dtype == weights[0].dtype for w in weights):
        weight = torch.cat(weights)
    else:
        return None
    merged = Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
    set_weight(merged, "weight", weight)
    if biases[0] is not None:
        set_weight(merged, "bias", torch.cat(biases))
    return merged


def fuse_qkv(attn: Attention) -> None:
    """q_proj, k_proj and v_proj as one matrix: one kernel instead of three per decode step. The
    separate modules are dropped, so the weights are never held twice."""
    if attn.qkv_proj is not None:
        return
    merged = _concatenated([attn.q_proj, attn.k_proj, attn.v_proj])
    if merged is not None:
        attn.qkv_proj = merged
        del attn.q_proj, attn.k_proj, attn.v_proj


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


def shared_into_experts(moe: MoE) -> bool:
    """Make the shared experts more experts of the stack, which every token takes with weight 1:
    the routed experts' two kernels then do the shared experts' work too, three kernels fewer a
    layer. The shared MLP's intermediate size is num_shared times the experts', so it splits
    exactly: SwiGLU acts on each intermediate unit alone, and down sums over the units. False, and
    nothing changed, where the weights' forms do not allow it."""
    mlp, experts = moe.shared_experts, moe.experts
    if mlp is None or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
        return False
    if experts.owned is not None:  # split over ranks: such a stack sums only the slots routed to its own experts
        return False
    count = mlp.gate_up_proj.out_features // experts.gate_up_proj.shape[1]
    pairs = ((experts.gate_up_proj, mlp.gate_up_proj.weight, shared_gate_up_as_experts),
             (experts.down_proj, mlp.down_proj.weight, shared_down_as_experts))
    if all(isinstance(stack, QuantWeight) for stack, _, _ in pairs):
        if not all(stack.can_append(part) for stack, part, _ in pairs):
            return False
        if experts.down_proj.fmt == "int4" and experts.down_proj.in_features % experts.down_proj.group_size:
            return False  # the shared down's groups of columns would straddle two parts
        for stack, part, split in pairs:
            stack.append({key: split(getattr(part, key), count) for key in ("qweight", "scales", "zeros") if getattr(part, key, None) is not None})
    elif all(isinstance(stack, torch.Tensor) and isinstance(part, torch.Tensor) and part.dtype == stack.dtype for stack, part, _ in pairs):
        set_weight(experts, "gate_up_proj", torch.cat([experts.gate_up_proj, shared_gate_up_as_experts(mlp.gate_up_proj.weight, count)]))
        set_weight(experts, "down_proj", torch.cat([experts.down_proj, shared_down_as_experts(mlp.down_proj.weight, count)]))
    else:
        return False
    moe.shared_experts, moe.gate.always = None, count
    return True
