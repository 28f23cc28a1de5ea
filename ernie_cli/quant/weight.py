"""A quantized weight: what `ernie quantize` writes (int8 per output channel, or int4 in groups
with a scale and a zero each), held on the device in the layout of the kernel that multiplies it.

A QuantWeight stands where a float weight would: in a Linear, as an Embedding's table, or as an
expert stack [E, out, in]. The operations of ernie_cli/kernels/ops.py accept either; the products
themselves are in ernie_cli/kernels/quantized.py. Layouts (the `backend`, chosen by
kernels.ops.choose_backend at load time):
- "native" and "dequant": the disk layout as the file stores it (native: x86 CPUs with AVX-512
  VNNI or AVX2, read by kernels/cpu; dequant: CUDA, and any device, expanded to floats or read by the
  Triton GEMVs).
- "cpu": torch's weight-only int kernels' own layouts, made here at load time: int8 padded to
  K % 16 == 0; int4 packed for `_weight_int4pack_mm_for_cpu` (N % 16 == 0, K a multiple of the group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cli.quant import formats

BF16 = torch.bfloat16
CPU_INT4_GROUPS = (32, 64, 128, 256)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


_BLOCK_UNKNOWN = -1
_cpu_int4_block = _BLOCK_UNKNOWN


def _interleave(codes: torch.Tensor, block: int) -> torch.Tensor:
    """codes uint8 [N, K] -> [N/block, K, block/2] bytes: row d in the low nibble, row d + block/2 in the high one."""
    n, k = codes.shape
    c = codes.view(n // block, 2, block // 2, k)
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def _probe_cpu_int4_block() -> int | None:
    """The row block of torch's CPU int4 layout on this machine (64 with AVX-512), found by comparing
    with `_convert_weight_to_int4pack_for_cpu` itself; None if it matches no simple interleave."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    ref = torch._convert_weight_to_int4pack_for_cpu(codes, 8)
    for block in (64, 32, 16):
        if torch.equal(_interleave(codes.to(torch.uint8), block), ref):
            return block
    return None


def _cpu_block() -> int | None:
    global _cpu_int4_block
    if _cpu_int4_block == _BLOCK_UNKNOWN:
        _cpu_int4_block = _probe_cpu_int4_block()
    return _cpu_int4_block


def _repack_disk_bytes(qweight: torch.Tensor, block: int) -> torch.Tensor:
    """The disk layout (uint8 [N, K/2], columns 2j/2j+1 in the low/high nibble) straight to the CPU
    kernel's, without unpacking to one code per byte: the same result as cpu_int4_pack(unpack_int4(q))."""
    n, half = qweight.shape
    q = qweight.view(n // block, 2, block // 2, half)
    a, b = q[:, 0], q[:, 1]  # rows d and d + block/2 of each block
    even = (a & 0x0F) | (b << 4)  # column 2j: both low nibbles
    odd = (a >> 4) | (b & 0xF0)  # column 2j+1: both high nibbles
    return torch.stack((even, odd), dim=-1).view(n // block, block // 2, 2 * half).transpose(1, 2).contiguous().view(n, half)


def cpu_int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> the packed uint8 [N, K/2] that `_weight_int4pack_mm_for_cpu` reads.

    torch's converter wants int32 codes (4 bytes a weight) and takes ~3x longer than the same
    byte shuffle done here; the shuffle is checked against the converter once per process, and the
    converter is used whenever they could differ."""
    block = _cpu_block()
    if block is not None and codes.shape[0] % block == 0:
        return _interleave(codes, block)
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8).view(codes.shape[0], codes.shape[1] // 2)


class QuantWeight(nn.Module):
    """A quantized weight [out, in] or stack [E, out, in] in its kernel's layout."""

    def __init__(self, fmt: str, shape: tuple[int, ...], group_size: int, backend: str):
        super().__init__()
        self.fmt, self.shape, self.group_size, self.backend = fmt, tuple(shape), group_size, backend
        self.out_features, self.in_features = self.shape[-2:]
        self.stacked = len(self.shape) == 3
        self.k_pad, self.n_pad = self.in_features, self.out_features
        self.disk_layout = backend in ("dequant", "native")  # tensors kept as the file stores them

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.fmt}, shape={list(self.shape)}{g}, backend={self.backend}"

    # ---- building ----------------------------------------------------------------------------------

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device) -> "QuantWeight":
        """Take the disk layout ({"qweight", "scales"[, "zeros"]}, on any device) and prepare the kernel's."""
        if self.disk_layout:
            for key, value in tensors.items():
                setattr(self, key, _param(value.to(device).contiguous()))
        elif self.fmt == "int8":
            self._load_cpu_int8(tensors, device)
        else:
            self._load_cpu_int4(tensors, device)
        return self

    def _load_cpu_int8(self, tensors, device) -> None:
        q = tensors["qweight"].to(device)
        self.k_pad = _round_up(self.in_features, 16)
        if self.k_pad != self.in_features:
            q = F.pad(q, (0, self.k_pad - self.in_features))
        self.qweight = _param(q.contiguous())
        self.scales = _param(tensors["scales"].to(device, BF16).contiguous())

    def _load_cpu_int4(self, tensors, device) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        self.k_pad, self.n_pad = _round_up(k, g), _round_up(n, 16)
        groups = self.k_pad // g
        lead = self.shape[:-2]
        count = self.shape[0] if self.stacked else 1
        packed = torch.empty((count, self.n_pad, self.k_pad // 2), dtype=torch.uint8, device=device)
        sz = torch.zeros((count, groups, self.n_pad, 2), dtype=BF16, device=device)
        qweight = tensors["qweight"].reshape(count, n, k // 2)
        scales = tensors["scales"].reshape(count, n, groups)
        zeros = tensors["zeros"].reshape(count, n, groups)
        block = _cpu_block()
        for e in range(count):  # one matrix at a time
            if (self.n_pad, self.k_pad) == (n, k) and block and n % block == 0:
                packed[e] = _repack_disk_bytes(qweight[e].to(device), block)
            else:
                codes = formats.unpack_int4(qweight[e].to(device))
                codes = F.pad(codes, (0, self.k_pad - k, 0, self.n_pad - n), value=formats.INT4_MID)
                packed[e] = cpu_int4_pack(codes)
                del codes
            sz[e, :, :n, 0] = scales[e].t().to(device, BF16)
            sz[e, :, :n, 1] = zeros[e].t().to(device, BF16)
        self.packed = _param(packed.view(*lead, self.n_pad, self.k_pad // 2) if lead else packed[0])
        self.scales_and_zeros = _param(sz.view(*lead, groups, self.n_pad, 2) if lead else sz[0])

    def disk_tensors(self, experts=None):
        """(qweight, scales, zeros or None, experts) of the disk layout; an int expert becomes views of
        its own weights (experts None), an index tensor or None is passed on to the kernel."""
        q, s, z = self.qweight, self.scales, getattr(self, "zeros", None)
        if isinstance(experts, int):
            return q[experts], s[experts], (None if z is None else z[experts]), None
        return q, s, z, experts

    # ---- fusing, done by the loader ----------------------------------------------------------------

    @classmethod
    def concatenate(cls, parts: list["QuantWeight"]) -> "QuantWeight | None":
        """The parts' rows stacked into one weight (q, k and v as one matrix), where they share a
        format, group, input size and backend and are held in the disk layout, whose tensors are
        row-wise; None where not."""
        first = parts[0]
        same = all(
            isinstance(p, cls) and p.disk_layout and not p.stacked
            and (p.fmt, p.group_size, p.in_features, p.backend) == (first.fmt, first.group_size, first.in_features, first.backend)
            for p in parts
        )
        if not same:
            return None
        merged = cls(first.fmt, (sum(p.out_features for p in parts), first.in_features), first.group_size, first.backend)
        for key in ("qweight", "scales", "zeros"):
            if getattr(first, key, None) is not None:
                setattr(merged, key, _param(torch.cat([getattr(p, key) for p in parts])))
        return merged

    def can_append(self, part: "QuantWeight") -> bool:
        return (isinstance(part, QuantWeight) and part.disk_layout and self.disk_layout and self.stacked and not part.stacked
                and (part.fmt, part.group_size, part.backend) == (self.fmt, self.group_size, self.backend))

    def append(self, parts: dict[str, torch.Tensor]) -> None:
        """Grow a stack by more experts given in the disk layout ({"qweight", "scales"[, "zeros"]}, [n, ...])."""
        for key, value in parts.items():
            setattr(self, key, _param(torch.cat([getattr(self, key), value])))
        self.shape = (self.shape[0] + parts["qweight"].shape[0], *self.shape[1:])

    # ---- reading back -------------------------------------------------------------------------------

    def dequantize(self, expert=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (of one expert, or of the experts an index tensor names, stacked in its shape)."""
        if self.disk_layout:
            pick = (lambda t: t) if expert is None else (lambda t: t[expert])
            if self.fmt == "int8":
                return formats.dequantize_int8(pick(self.qweight), pick(self.scales), dtype)
            return formats.dequantize_int4(pick(self.qweight), pick(self.scales), pick(self.zeros), self.group_size, dtype)
        if self.fmt == "int8":
            q = self.qweight if expert is None else self.qweight[expert]
            s = self.scales if expert is None else self.scales[expert]
            return formats.dequantize_int8(q[..., : self.in_features], s, dtype)
        if expert is None and self.stacked:
            return torch.stack([self.dequantize(e, dtype) for e in range(self.shape[0])])
        # The int4 CPU layout is opaque: read the weight back through the kernel itself (debugging aid).
        eye = torch.eye(self.k_pad, dtype=BF16, device=self.packed.device)
        w = self.packed if expert is None else self.packed[expert]
        sz = self.scales_and_zeros if expert is None else self.scales_and_zeros[expert]
        full = torch._weight_int4pack_mm_for_cpu(eye, w, self.group_size, sz).t()
        return full[: self.out_features, : self.in_features].to(dtype)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of a model."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantWeight))
