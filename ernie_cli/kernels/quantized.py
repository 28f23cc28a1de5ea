"""Products with a quantized weight (ernie_cli.quant.weight.QuantWeight), by its layout.

- "native": the AVX-512 VNNI or AVX2 kernels of kernels/cpu, which read the disk layout as it is and
  quantize the activations to int8 per block of 64, like llama.cpp's Q8_0 activations; the
  selected experts of a token are one call. From native.PREFILL_TOKENS tokens in one product the
  work is arithmetic, not reading: the weight is expanded to floats in C and torch's matmul runs
  (not on the AVX2 build, where the integer kernel stays faster: Kernels.expands).
- "cpu": torch's weight-only int kernels, fed bfloat16 activations (float32 activations make the
  int8 kernel about ten times slower on the CPU) and cast back to the activation dtype.
- "dequant": one token on CUDA through the Triton GEMVs (bytes to floats in registers); many
  tokens on CUDA expanded to floats by one Triton pass, then the tensor cores; elsewhere expanded
  by torch just before the matmul.
kernels/ops.py decides which function here runs; this module only does the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ernie_cli.kernels.cpu import native
from ernie_cli.kernels.triton import dequant as triton_dequant
from ernie_cli.kernels.triton import gemv as triton_gemv
from ernie_cli.quant.weight import QuantWeight

BF16 = torch.bfloat16


def native_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels read float32 or bf16 directly; anything else goes in as float32."""
    return (x if x.dtype in (torch.float32, BF16) else x.float()).contiguous()


def native_mm(w: QuantWeight, x: torch.Tensor, experts=None, per_expert_x: bool = False, out_dtype=None) -> torch.Tensor:
    """x float32/bf16 [M, in] -> [P, M, out] for the P experts named by `experts` (an int, an index
    tensor, or None for an unstacked weight); per_expert_x: x is [P, M, in]. Output in out_dtype
    where it is float32 or bf16, else float32."""
    out_dtype = out_dtype if out_dtype in (torch.float32, BF16) else torch.float32
    q, s, z, experts = w.disk_tensors(experts)
    if torch.compiler.is_compiling():  # the same kernels, as one opaque operator in the graph
        bits = 4 if w.fmt == "int4" else 8
        return torch.ops.ernie.int_matmul(bits, q, s, z, x, w.group_size, experts, per_expert_x, out_dtype == BF16)
    k = native.kernels()
    if w.fmt == "int4":
        return k.int4(q, s, z, x, w.group_size, experts, per_expert_x, out_dtype)
    return k.int8(q, s, x, experts, per_expert_x, out_dtype)


def native_dequantize(w: QuantWeight, expert: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight (expert `expert` of a stack) as float32/bf16 [out, in] in the native kernels'
    scratch buffer, valid until their next call."""
    bits = 4 if w.fmt == "int4" else 8
    return native.kernels().dequantize(bits, w.qweight, w.scales, getattr(w, "zeros", None), w.group_size, expert or 0, dtype)


def gpu_dequantize(w: QuantWeight, expert: int | None, dtype: torch.dtype, slot: str = "") -> torch.Tensor:
    """The weight (expert `expert` of a stack, or the whole stack) as floats in the Triton
    dequantizer's scratch buffer for (slot, shape), valid until its next use."""
    q, s, z, _ = w.disk_tensors(expert)
    return triton_dequant.dequantize(w.fmt, q, s, z, w.group_size, w.in_features, dtype, slot)


def gemv(w: QuantWeight, x: torch.Tensor, experts=None, per_expert_x: bool = False, swiglu: bool = False) -> torch.Tensor:
    """One token on CUDA through the Triton GEMVs: [P, out] for the experts tensor, [1, out] else."""
    q, s, z, experts = w.disk_tensors(experts)
    return triton_gemv.gemv(w.fmt, x, q, s, z, w.group_size, experts, per_expert_x, swiglu=swiglu)


def matmul(w: QuantWeight, x: torch.Tensor, expert=None, gpu_dequant: bool = False) -> torch.Tensor:
    """x [M, in] -> x @ W.T [M, out] (W = expert `expert` of a stack), in x's dtype.
    gpu_dequant: many tokens on CUDA, eagerly: one Triton pass to floats, then the tensor cores."""
    if w.backend == "native":
        if not torch.compiler.is_compiling() and native.kernels().expands(x.shape[0]):
            f = native_dequantize(w, expert, BF16 if x.dtype == BF16 else torch.float32)
            return F.linear(x.to(f.dtype), f).to(x.dtype)
        return native_mm(w, native_input(x), expert, out_dtype=x.dtype)[0].to(x.dtype)
    if w.disk_layout:
        if x.shape[0] == 1 and torch.compiler.is_compiling():
            # Decode: a multiply-and-sum lets Inductor fuse the dequantization into the reduction,
            # so only the int8/int4 bytes are read; F.linear would first write a bf16 copy.
            return (w.dequantize(expert, x.dtype) * x[:, None, :]).sum(-1)
        if gpu_dequant:
            return F.linear(x, gpu_dequantize(w, expert, x.dtype))
        if w.fmt == "int8":
            q = w.qweight if expert is None else w.qweight[expert]
            s = w.scales if expert is None else w.scales[expert]
            return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
        return F.linear(x, w.dequantize(expert, x.dtype))
    xb = x.to(BF16)
    if w.k_pad != w.in_features:
        xb = F.pad(xb, (0, w.k_pad - w.in_features))
    xb = xb.contiguous()
    if w.fmt == "int8":
        q = w.qweight if expert is None else w.qweight[expert]
        s = w.scales if expert is None else w.scales[expert]
        y = torch._weight_int8pack_mm(xb, q, s)
    else:
        packed = w.packed if expert is None else w.packed[expert]
        sz = w.scales_and_zeros if expert is None else w.scales_and_zeros[expert]
        y = torch._weight_int4pack_mm_for_cpu(xb, packed, w.group_size, sz)
        if w.n_pad != w.out_features:
            y = y[:, : w.out_features]
    return y.to(x.dtype)


def embed(w: QuantWeight, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an int8 embedding table, as floats of the activation dtype."""
    rows = w.qweight[tokens]
    if rows.shape[-1] != w.in_features:
        rows = rows[..., : w.in_features]
    return (rows.float() * w.scales[tokens].float().unsqueeze(-1)).to(dtype)


# ---- the expert strategies' pieces (kernels/ops.experts) -------------------------------------------


def selected_native(w: QuantWeight, per_expert_x: bool = False):
    """gate_up(x [H], experts) -> [k, 2I], or down(h [k, I], experts) -> [k, H] in float32, in one call."""
    if per_expert_x:
        return lambda h, e: native_mm(w, h[:, None], e, per_expert_x=True, out_dtype=torch.float32)[:, 0]
    return lambda v, e: native_mm(w, native_input(v[None]), e)[:, 0]


def selected_gemv(w: QuantWeight, per_expert_x: bool = False, swiglu: bool = False):
    return lambda v, e: gemv(w, v, e, per_expert_x=per_expert_x, swiglu=swiglu)


def gather(w, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The experts an index tensor names, as floats [*idx.shape, out, in]."""
    if isinstance(w, QuantWeight):
        return w.dequantize(idx, dtype)
    return w[idx]


def float_stack(w, dtype: torch.dtype) -> torch.Tensor:
    """A whole expert stack as floats for the grouped GEMMs (a quantized one in the dequantizer's buffer)."""
    if isinstance(w, QuantWeight):
        return gpu_dequantize(w, None, dtype, "experts")
    return w
