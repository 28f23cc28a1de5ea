"""The two weight-only formats: their math, their packing, nothing device-specific.

Both quantize a weight matrix W [out, in] (or a stack [E, out, in]) along its input dimension:

int8, symmetric per output channel
    q = clamp(round(W / s), -127, 127) as int8 [out, in], one scale s per row: scales [out].
    W ≈ q · s.

int4, asymmetric per group of `group_size` consecutive input columns
    codes q in 0..15 packed two per byte along the input dimension, the even column in the low
    nibble: qweight uint8 [out, in/2]; one scale and one zero per group: scales, zeros [out, ceil(in/g)].
    W ≈ (q - 8) · scale + zero, i.e. `zero` is the float value that code 8 stands for. This is the
    convention of torch's int4 kernels (tinygemm, `_weight_int4pack_mm_for_cpu`), so the stored
    numbers feed them without any arithmetic. A last group shorter than `group_size` is allowed.

Scales and zeros are stored in bfloat16, the dtype the kernels read; the codes are chosen against
the rounded bf16 values, so what the file holds is exactly what the kernels compute with.

int4 scales and zeros start from each group's min and max (round-to-nearest, RTN) and are then
refined without calibration data by a few rounds of the half-quadratic alternation HQQ uses: fix the
codes, solve the scale and zero in closed form (least squares per group), re-round the codes. HQQ
(mobiusml/hqq, `optimize_weights_proximal_legacy`) updates only the zero and adds an l_p shrinkage
of the error with threshold (1/β)|e|^(p-1), β=10, p=0.7; for weights of LLM magnitude (|e| ≲ 0.01)
that threshold exceeds every error, so its shrinkage is the identity and its step is this
least-squares step restricted to the zero. Updating the scale as well lowers the error further; each
half-step is optimal for its variables, so the error never rises above RTN's. The numbers are in
docs/quantize.md.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16
INT8_MAX = 127
INT4_MAX = 15
INT4_MID = 8
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
DEFAULT_REFINE_STEPS = 4  # 0 = plain round-to-nearest
_TINY = 1e-10  # floor of a scale: a constant group or row quantizes exactly, without dividing by zero
_CHUNK = 1 << 18  # elements per slice of work on the CPU: the float32 temporaries stay in its cache
_CHUNK_GPU = 1 << 26  # on a GPU small slices only add launches (the full int4 model took over 200 s)


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, w.shape[-1])


def _row_chunks(rows: int, cols: int, device: torch.device):
    step = max(1, (_CHUNK if device.type == "cpu" else _CHUNK_GPU) // max(cols, 1))
    for begin in range(0, rows, step):
        yield begin, min(rows, begin + step)


# ---- int8 ---------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] float -> (qweight int8 [..., out, in], scales bf16 [..., out])."""
    flat = _rows(w)
    q = torch.empty(flat.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(flat.shape[0], dtype=SCALE_DTYPE, device=w.device)
    for a, b in _row_chunks(*flat.shape, w.device):
        x = flat[a:b].float()
        s = (x.abs().amax(-1) / INT8_MAX).clamp_(min=_TINY).to(SCALE_DTYPE)
        scales[a:b] = s
        q[a:b] = x.div_(s.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.view(w.shape), scales.view(w.shape[:-1])


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.float() * scales.float().unsqueeze(-1)).to(dtype)


# ---- int4 packing -------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [..., in] (0..15, any integer dtype; `in` even) -> uint8 [..., in/2], even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> codes uint8 [..., in]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


# ---- int4 ---------------------------------------------------------------------------------------


def _group_mean(x: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(-1, keepdim=True)
    return (x * mask).sum(-1, keepdim=True) / count


def _int4_rows(w: torch.Tensor, group_size: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w float32 [r, in] -> (codes uint8 [r, in], scales bf16 [r, G], zeros bf16 [r, G])."""
    r, k = w.shape
    g = group_size
    groups = num_groups(k, g)
    pad = groups * g - k
    mask = count = None
    if pad:  # repeat the last column: min and max are unchanged, the means below skip the copies
        w = torch.cat([w, w[:, -1:].expand(r, pad)], dim=1)
        mask = torch.ones(groups * g, device=w.device)
        mask[k:] = 0
        mask = mask.view(groups, g)
        count = mask.sum(-1, keepdim=True)
    wg = w.view(r, groups, g)
    lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)
    scale = ((hi - lo) / INT4_MAX).clamp_(min=_TINY)
    zero = -lo / scale  # HQQ's integer-domain zero: W ≈ (q - zero) · scale
    if steps:
        w_mean = _group_mean(wg, mask, count)
        for _ in range(steps):
            q = (wg / scale).add_(zero).round_().clamp_(0, INT4_MAX)
            q_mean = _group_mean(q, mask, count)
            dq = q.sub_(q_mean)  # q is not needed past this point
            var = _group_mean(dq * dq, mask, count)
            cov = _group_mean(dq.mul_(wg), mask, count)  # = cov(q, w): the centred dq sums to zero
            fitted = torch.where(var > 0, cov / var.clamp(min=1e-30), scale).clamp_(min=_TINY)
            scale, zero = fitted, q_mean - w_mean / fitted
    s = scale.to(SCALE_DTYPE)
    z = ((INT4_MID - zero) * scale).to(SCALE_DTYPE)  # the float value of code 8
    codes = (wg - z.float()).div_(s.float()).add_(INT4_MID).round_().clamp_(0, INT4_MAX)
    codes = codes.view(r, groups * g)[:, :k].to(torch.uint8)
    return codes, s.view(r, groups), z.view(r, groups)


def quantize_int4(
    w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, steps: int = DEFAULT_REFINE_STEPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., out, in] float -> (qweight uint8 [..., out, in/2], scales bf16 [..., out, G], zeros bf16 [..., out, G])."""
    k = w.shape[-1]
    if k % 2:
        raise ValueError(f"int4 needs an even input dimension, got {k}")
    flat = _rows(w)
    groups = num_groups(k, group_size)
    packed = torch.empty(flat.shape[0], k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(flat.shape[0], groups, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    for a, b in _row_chunks(*flat.shape, w.device):
        codes, scales[a:b], zeros[a:b] = _int4_rows(flat[a:b].float(), group_size, steps)
        packed[a:b] = pack_int4(codes)
    lead = w.shape[:-1]
    return packed.view(*lead, k // 2), scales.view(*lead, groups), zeros.view(*lead, groups)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[..., G] per-group values -> [..., in] per-column values."""
    return t.repeat_interleave(group_size, dim=-1)[..., :in_features]


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    q = unpack_int4(qweight)
    k = q.shape[-1]
    s = expand_groups(scales.float(), group_size, k)
    z = expand_groups(zeros.float(), group_size, k)
    return ((q.float() - INT4_MID) * s + z).to(dtype)


# ---- bookkeeping --------------------------------------------------------------------------------


def quantized_shapes(fmt: str, shape: tuple[int, ...], group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors one float weight of `shape` becomes on disk: suffix -> (shape, dtype)."""
    *lead, k = shape
    if fmt == "int8":
        return {"qweight": (tuple(shape), torch.int8), "scales": (tuple(lead), SCALE_DTYPE)}
    if fmt == "int4":
        g = num_groups(k, group_size)
        return {
            "qweight": ((*lead, k // 2), torch.uint8),
            "scales": ((*lead, g), SCALE_DTYPE),
            "zeros": ((*lead, g), SCALE_DTYPE),
        }
    raise ValueError(f"unknown format {fmt!r}")


def quantized_nbytes(fmt: str, shape: tuple[int, ...], group_size: int) -> int:
    total = 0
    for s, dtype in quantized_shapes(fmt, shape, group_size).values():
        n = 1
        for d in s:
            n *= d
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def quantize(fmt: str, w: torch.Tensor, group_size: int, steps: int = DEFAULT_REFINE_STEPS) -> dict[str, torch.Tensor]:
    if fmt == "int8":
        q, s = quantize_int8(w)
        return {"qweight": q, "scales": s}
    q, s, z = quantize_int4(w, group_size, steps)
    return {"qweight": q, "scales": s, "zeros": z}


def dequantize(fmt: str, tensors: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if fmt == "int8":
        return dequantize_int8(tensors["qweight"], tensors["scales"], dtype)
    return dequantize_int4(tensors["qweight"], tensors["scales"], tensors["zeros"], group_size, dtype)
