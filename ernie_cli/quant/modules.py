"""Quantized runtime modules: the float modules' forward interface, the weights kept quantized.

- `QuantWeight`: one int8/int4 weight [out, in], or a stack of them [E, out, in], held in the layout
  of the kernel that multiplies it, with `mm(x, expert)`.
- `QuantLinear` (replaces nn.Linear), `QuantEmbedding` (replaces the int8 embedding and, when tied,
  the head), `QuantExperts` (replaces the stacked routed experts).

Three backends:
- "native": x86 CPUs with AVX-512 VNNI: the kernels of cpu_kernels.c (see native.py), which read the
  disk layout as it is and quantize the activations to int8 per block of 64, like llama.cpp's
  Q8_0 activations. About 1.5x the bandwidth of torch's kernels at batch 1, no repacking at load;
  the selected experts of a token are one call. The default where it builds. Prefill (from
  native.PREFILL_TOKENS tokens in one product) expands the weight to floats in C instead and uses
  torch's matmul (AMX where the CPU has it): there the work is arithmetic, not reading.
- "cpu": torch's weight-only kernels, fed bfloat16 activations (with float32 activations the int8
  kernel took 1.3-1.4 ms on a 1536x2560 matrix at M = 1, against 131-247 µs with bf16) and cast back
  to the model's dtype. int8: `_weight_int8pack_mm` (needs K % 16 == 0: the weight is padded with
  zero columns at load time otherwise). int4: `_weight_int4pack_mm_for_cpu`, whose packed layout is
  made at load time by `_convert_weight_to_int4pack_for_cpu` (needs N % 16 == 0, K a multiple of the
  group size: rows and columns are padded at load time when they are not).
- "dequant": any device (CUDA): the disk layout as it is. One token on CUDA goes through the Triton
  GEMVs of ernie_cli/gpu_gemv.py (bytes to floats in registers, the selected experts in one launch);
  otherwise a weight is dequantized to the activation dtype just before its matmul. Graph-friendly
  either way (static shapes, no host sync in the one-token path).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cli import gpu_dequant, gpu_gemv
from ernie_cli.model import GROUPED_MM, run_grouped, run_grouped_mm, run_selected, shared_down_as_experts, shared_gate_up_as_experts
from ernie_cli.quant import formats, native

BF16 = torch.bfloat16
CPU_INT4_GROUPS = (32, 64, 128, 256)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def choose_backend(fmt: str, group_size: int, device: torch.device, in_features: int) -> str:
    """"native" on the CPU where its kernels build and the shape suits them, else "cpu" (torch's int
    kernels) where they apply, else "dequant".

    ERNIE_QUANT_BACKEND=cpu|dequant forces a backend on the CPU: "dequant" is the code the CUDA path
    runs, checkable without a GPU.
    """
    forced = os.environ.get("ERNIE_QUANT_BACKEND", "")
    if device.type != "cpu" or forced == "dequant":
        return "dequant"
    fits_native = in_features % native.BLOCK == 0 and in_features <= native.MAX_IN_FEATURES and (fmt == "int8" or group_size % native.BLOCK == 0)
    if forced != "cpu" and fits_native and native.kernels() is not None:
        return "native"
    if fmt == "int8" or group_size in CPU_INT4_GROUPS:
        return "cpu"
    return "dequant"


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


def _native_input(x: torch.Tensor) -> torch.Tensor:
    """The kernels read float32 or bf16 directly; anything else goes in as float32."""
    return (x if x.dtype in (torch.float32, BF16) else x.float()).contiguous()


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

    # ---- computing ---------------------------------------------------------------------------------

    def mm(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """x [M, in] -> x @ W.T [M, out] (W = expert `expert` of a stack), in x's dtype."""
        if self.backend == "native":
            # From PREFILL_TOKENS tokens the product is compute-bound: floats and torch's matmul win.
            if x.shape[0] >= native.PREFILL_TOKENS and not torch.compiler.is_compiling():
                w = self.native_dequantize(expert, BF16 if x.dtype == BF16 else torch.float32)
                return F.linear(x.to(w.dtype), w).to(x.dtype)
            return self.native_mm(_native_input(x), expert, out_dtype=x.dtype)[0].to(x.dtype)
        if self.disk_layout:
            if gpu_gemv.usable(x, self.fmt, self.group_size):
                return self._gpu_gemv(x[0], expert)
            if x.shape[0] == 1 and torch.compiler.is_compiling():
                # Decode: a multiply-and-sum lets Inductor fuse the dequantization into the reduction,
                # so only the int8/int4 bytes are read; F.linear would first write a bf16 copy.
                return (self.dequantize(expert, x.dtype) * x[:, None, :]).sum(-1)
            if gpu_dequant.usable(x):  # many tokens on CUDA: one pass to floats, then the tensor cores
                return F.linear(x, self.gpu_dequantize(expert, x.dtype))
            if self.fmt == "int8":
                q = self.qweight if expert is None else self.qweight[expert]
                s = self.scales if expert is None else self.scales[expert]
                return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
            return F.linear(x, self.dequantize(expert, x.dtype))
        xb = x.to(BF16)
        if self.k_pad != self.in_features:
            xb = F.pad(xb, (0, self.k_pad - self.in_features))
        xb = xb.contiguous()
        if self.fmt == "int8":
            q = self.qweight if expert is None else self.qweight[expert]
            s = self.scales if expert is None else self.scales[expert]
            y = torch._weight_int8pack_mm(xb, q, s)
        else:
            w = self.packed if expert is None else self.packed[expert]
            sz = self.scales_and_zeros if expert is None else self.scales_and_zeros[expert]
            y = torch._weight_int4pack_mm_for_cpu(xb, w, self.group_size, sz)
            if self.n_pad != self.out_features:
                y = y[:, : self.out_features]
        return y.to(x.dtype)

    def _gpu_gemv(self, x: torch.Tensor, experts=None, per_expert_x: bool = False, swiglu: bool = False) -> torch.Tensor:
        """One token on CUDA through gpu_gemv (Triton): [P, out] for the experts tensor, [1, out] else."""
        q, s, z, experts = self._disk_tensors(experts)
        return gpu_gemv.gemv(self.fmt, x, q, s, z, self.group_size, experts, per_expert_x, swiglu=swiglu)

    def _disk_tensors(self, experts):
        """(qweight, scales, zeros or None, experts) of the disk layout; an int expert becomes views of
        its own weights (experts None), an index tensor or None is passed on to the kernel."""
        q, s, z = self.qweight, self.scales, getattr(self, "zeros", None)
        if isinstance(experts, int):
            return q[experts], s[experts], (None if z is None else z[experts]), None
        return q, s, z, experts

    def native_mm(self, x: torch.Tensor, experts=None, per_expert_x: bool = False, out_dtype=None) -> torch.Tensor:
        """The native kernel: x float32/bf16 [M, in] -> [P, M, out] for the P experts named by `experts`
        (an int, an index tensor, or None for an unstacked weight); per_expert_x: x is [P, M, in].
        Output in out_dtype where it is float32 or bf16, else float32."""
        out_dtype = out_dtype if out_dtype in (torch.float32, BF16) else torch.float32
        q, s, z, experts = self._disk_tensors(experts)
        if torch.compiler.is_compiling():  # the same kernels, as one opaque operator in the graph
            bits = 4 if self.fmt == "int4" else 8
            return torch.ops.ernie.int_matmul(bits, q, s, z, x, self.group_size, experts, per_expert_x, out_dtype == BF16)
        k = native.kernels()
        if self.fmt == "int4":
            return k.int4(q, s, z, x, self.group_size, experts, per_expert_x, out_dtype)
        return k.int8(q, s, x, experts, per_expert_x, out_dtype)

    def gpu_dequantize(self, expert: int | None, dtype: torch.dtype, slot: str = "") -> torch.Tensor:
        """The weight (expert `expert` of a stack, or the whole stack) as floats in gpu_dequant's
        scratch buffer for (slot, shape), valid until its next use."""
        q, s, z, _ = self._disk_tensors(expert)
        return gpu_dequant.dequantize(self.fmt, q, s, z, self.group_size, self.in_features, dtype, slot)

    def native_dequantize(self, expert: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The weight (expert `expert` of a stack) as float32/bf16 [out, in] in the native kernels'
        scratch buffer, valid until their next call."""
        bits = 4 if self.fmt == "int4" else 8
        return native.kernels().dequantize(bits, self.qweight, self.scales, getattr(self, "zeros", None), self.group_size, expert or 0, dtype)

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


class QuantLinear(QuantWeight):
    """nn.Linear with a quantized weight (and an optional float bias)."""

    def __init__(self, fmt: str, shape: tuple[int, int], group_size: int, backend: str):
        super().__init__(fmt, shape, group_size, backend)
        self.register_parameter("bias", None)  # set by the loader when the checkpoint has one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    project = forward  # as an untied lm_head

    @classmethod
    def concatenate(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """The parts' rows stacked into one weight (model.concatenate_linears), where they share a
        format, group and input size and are held in the disk layout, whose tensors are row-wise."""
        first = parts[0]
        same = all(
            type(p) is cls and p.disk_layout and (p.fmt, p.group_size, p.in_features, p.backend, p.bias is None)
            == (first.fmt, first.group_size, first.in_features, first.backend, first.bias is None)
            for p in parts
        )
        if not same:
            return None
        merged = cls(first.fmt, (sum(p.out_features for p in parts), first.in_features), first.group_size, first.backend)
        for key in ("qweight", "scales", "zeros", "bias"):
            if getattr(first, key, None) is not None:
                setattr(merged, key, _param(torch.cat([getattr(p, key) for p in parts])))
        return merged


class QuantEmbedding(QuantWeight):
    """An int8 embedding table [V, H]; `project` is the tied head (hidden -> logits) on the same bytes."""

    def __init__(self, shape: tuple[int, int], backend: str, dtype: torch.dtype):
        super().__init__("int8", shape, 0, backend)
        self.dtype = dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[tokens]
        if rows.shape[-1] != self.in_features:
            rows = rows[..., : self.in_features]
        return (rows.float() * self.scales[tokens].float().unsqueeze(-1)).to(self.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)


class QuantExperts(nn.Module):
    """The routed experts of one layer with quantized stacked weights; same forward as model.Experts."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj: QuantWeight | None = None  # [E, 2I, H]
        self.down_proj: QuantWeight | None = None  # [E, H, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            backends = {self.gate_up_proj.backend, self.down_proj.backend}
            if backends == {"native"}:
                return self.selected_native(x, weights, idx)
            if torch.compiler.is_compiling():
                return self.gathered(x, weights, idx) if "cpu" not in backends else self.selected_traced(x, weights, idx)
            if "dequant" not in backends:
                return self.selected(x, weights, idx)
            return self.gathered(x, weights, idx)
        return self.grouped(x, weights, idx)

    def _expert(self, x: torch.Tensor, e) -> torch.Tensor:
        gate, up = self.gate_up_proj.mm(x, e).chunk(2, dim=-1)
        return self.down_proj.mm(F.silu(gate) * up, e)

    def selected(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One token on the CPU: only its k experts' bytes are touched, one int kernel call each."""
        chosen = idx[0].tolist()  # a CPU tensor: no device sync; int indices take views, not copies
        out = torch.zeros_like(x)
        for slot in sorted(range(len(chosen)), key=chosen.__getitem__):  # ascending experts, as grouped sums
            out += self._expert(x, chosen[slot]) * weights[0, slot]
        return out

    def selected_native(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One token, native kernels: the k selected experts in one call per projection."""
        return run_selected(
            x, weights, idx,
            lambda v, e: self.gate_up_proj.native_mm(_native_input(v[None]), e)[:, 0],
            lambda h, e: self.down_proj.native_mm(h[:, None], e, per_expert_x=True, out_dtype=torch.float32)[:, 0],
        )

    def selected_traced(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The same under torch.compile: experts picked by 0-d tensor indices, no Python list."""
        out = torch.zeros_like(x)
        for slot in range(idx.shape[1]):
            out = out + self._expert(x, idx[0, slot]) * weights[0, slot]
        return out

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Graph-safe decode (CUDA): the Triton GEMVs on the selected experts where they run; else
        dequantize the selected experts by index, then batched GEMVs.

        Compiled, that multiply-and-sum form lets Inductor fuse the gather and the dequantization into
        the reduction (each selected expert's bytes read once); eagerly, einsum avoids the product temporary.
        """
        gu, down = self.gate_up_proj, self.down_proj
        if gpu_gemv.usable(x, gu.fmt, gu.group_size) and gpu_gemv.usable(x, down.fmt, down.group_size):
            return run_selected(x, weights, idx, gu._gpu_gemv, lambda h, e: down._gpu_gemv(h, e, per_expert_x=True, swiglu=True), True)
        w1 = self.gate_up_proj.dequantize(idx, x.dtype)
        w2 = self.down_proj.dequantize(idx, x.dtype)
        if torch.compiler.is_compiling():
            gate, up = (w1 * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)
            y = (w2 * (F.silu(gate) * up)[:, :, None, :]).sum(-1)
        else:
            gate, up = torch.einsum("nh,nkoh->nko", x, w1).chunk(2, dim=-1)
            y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, w2)
        return (y * weights[..., None]).sum(1)

    def append_shared(self, mlp: nn.Module, count: int) -> bool:
        """Take the shared MLP in as `count` more experts (model.MoE.fuse_shared_experts), where its
        two weights are held in the disk layout with the stacks' format, group and backend and have
        no bias; False, and nothing changed, where not. The disk layout's tensors are row-wise (codes,
        scales, zeros), so the model's row and column splits apply to each of them."""
        pairs = ((self.gate_up_proj, mlp.gate_up_proj, shared_gate_up_as_experts), (self.down_proj, mlp.down_proj, shared_down_as_experts))
        if not all(isinstance(part, QuantLinear) and part.bias is None and part.disk_layout and stack.disk_layout
                   and (part.fmt, part.group_size, part.backend) == (stack.fmt, stack.group_size, stack.backend)
                   for stack, part, _ in pairs):
            return False
        if self.down_proj.fmt == "int4" and self.down_proj.in_features % self.down_proj.group_size:
            return False  # the shared down's groups of columns would straddle two parts
        for stack, part, split in pairs:
            for key in ("qweight", "scales", "zeros"):
                if getattr(stack, key, None) is not None:
                    setattr(stack, key, _param(torch.cat([getattr(stack, key), split(getattr(part, key), count)])))
            stack.shape = (stack.shape[0] + count, *stack.shape[1:])
        return True

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Many tokens: on CUDA in bf16, every expert expanded to floats and the two grouped GEMMs of
        model.Experts; elsewhere grouped by expert, one (int kernel) GEMM per expert."""
        if self.uses_grouped_mm(x):
            w1 = self.gate_up_proj.gpu_dequantize(None, BF16, "experts")
            w2 = self.down_proj.gpu_dequantize(None, BF16, "experts")
            return run_grouped_mm(x, weights, idx, w1, w2)
        return run_grouped(self._expert, self.gate_up_proj.shape[0], x, weights, idx)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether many tokens like x take the two grouped GEMMs (else one GEMM per expert)."""
        backends = {self.gate_up_proj.backend, self.down_proj.backend}
        return x.dtype == BF16 and GROUPED_MM is not None and gpu_dequant.usable(x) and backends == {"dequant"}


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of a model."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantWeight))
