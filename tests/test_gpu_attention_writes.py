"""gpu_attention.rotate_write_decode: RoPE, the cache write and the decode attention in one operator,
against model.apply_rope bit for bit and float64 attention.

On the GPU: `pytest tests/test_gpu_attention_writes.py`. On the CPU under the Triton interpreter:
`DEVICE=cpu TRITON_INTERPRET=1 pytest tests/test_gpu_attention_writes.py` (fp16 only: the
interpreter's numpy has no bf16). Cache slots from pos on hold NaN before the call, so a kernel that
attends to an unwritten slot, or to the stale slot at pos instead of the new key, fails.
"""

import os

import pytest
import torch

from ernie_cli.kernels import ops
from ernie_cli.kernels.ops import rope_in_torch
from ernie_cli.kernels.triton import attention as gpu_attention
from ernie_cli.model.ernie import rope_table

DEVICE = os.environ.get("DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    gpu_attention.triton is None or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with DEVICE=cpu)",
)
DTYPES = [torch.float16] if DEVICE != "cuda" else [torch.bfloat16, torch.float16]


def _new_token(heads, kv, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, n, dim, generator=gen).to(dtype) for n in (heads, kv, kv)]


def _cache(kv, capacity, dim, pos, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    k, v = (torch.randn(1, kv, capacity, dim, generator=gen).to(dtype) for _ in range(2))
    k[:, :, pos:], v[:, :, pos:] = float("nan"), float("nan")
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv, dim", [(20, 4, 128), (8, 2, 64), (16, 16, 64)])
@pytest.mark.parametrize("capacity, pos", [(256, 0), (256, 63), (256, 64), (512, 299), (1024, 1023), (8448, 8192)])
@pytest.mark.parametrize("trig", ["row", "table"])
def test_rotates_writes_and_attends(dtype, heads, kv, dim, capacity, pos, trig):
    """Positions: the first; last of a block; first of the next; uneven stretches; every one of the
    16 stretches full (the last one too, whose weighing a combine could skip); 8k context. The
    operator is given the angles at pos alone, or the whole tables (the decode graph's way)."""
    q, k, v = _new_token(heads, kv, dim, dtype, seed=pos + dim)
    cache_k, cache_v = _cache(kv, capacity, dim, pos, dtype, seed=pos)
    cos_table, sin_table = rope_table(dim, 500000.0, capacity)
    cos, sin = cos_table[pos : pos + 1], sin_table[pos : pos + 1]
    # the model's own RoPE, as the torch path of Attention.forward applies it
    q_rot = rope_in_torch(q, cos, sin).transpose(1, 2)
    k_rot = rope_in_torch(k, cos, sin).transpose(1, 2)
    keys, values = cache_k.clone(), cache_v.clone()
    keys[:, :, pos], values[:, :, pos] = k_rot[:, :, 0], v[:, 0]

    given = (cos, sin) if trig == "row" else (cos_table, sin_table)
    dev = [t.to(DEVICE) for t in (q, k, v, cache_k, cache_v, *given)]
    position = torch.tensor([pos], device=DEVICE)
    out = gpu_attention.rotate_write_decode(*dev, position, dim**-0.5)[0, :, 0].double().cpu()
    got_k, got_v = dev[3].cpu(), dev[4].cpu()

    assert torch.equal(got_k[:, :, pos], k_rot[:, :, 0])  # bit for bit: torch's roundings
    assert torch.equal(got_v[:, :, pos], v[:, 0])
    assert torch.equal(got_k[:, :, :pos], cache_k[:, :, :pos]) and torch.equal(got_v[:, :, :pos], cache_v[:, :, :pos])
    assert got_k[:, :, pos + 1 :].isnan().all() and got_v[:, :, pos + 1 :].isnan().all()

    group, eps = heads // kv, 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    for h in range(heads):
        ks, vs = keys[0, h // group, : pos + 1].double(), values[0, h // group, : pos + 1].double()
        w = torch.softmax(ks @ q_rot[0, h, 0].double() * dim**-0.5, 0)
        ref = w @ vs
        # the weights are rounded to the activation dtype before the product with V, as flash
        # attention does; then the output's own rounding and float32 sums
        bound = eps * (w @ vs.abs() + ref.abs()) + 1e-5
        assert ((out[h] - ref).abs() <= bound).all(), h


class _Step(torch.nn.Module):
    """A decode step's use of the operator: the caches are buffers of the module, as KVCache's are."""

    def __init__(self, kv, capacity, dim, dtype):
        super().__init__()
        self.register_buffer("k", torch.full((1, kv, capacity, dim), float("nan"), dtype=dtype))
        self.register_buffer("v", torch.full((1, kv, capacity, dim), float("nan"), dtype=dtype))

    def forward(self, q, k, v, cos, sin, pos):
        return gpu_attention.rotate_write_decode(q, k, v, self.k, self.v, cos, sin, pos, q.shape[-1] ** -0.5)


def test_compiled_writes_into_the_cache_in_place():
    """Compiled as generate.Decoder compiles the step (on the GPU as one CUDA graph): each step's key
    and value must land in the module's own cache, with no copy of the cache (a copy would cost a
    whole cache's bytes a layer and a token), and the graph must follow the position tensor."""
    from torch._inductor.utils import run_and_get_code

    heads, kv, dim, capacity, steps = 8, 2, 64, 256, 5
    dtype = DTYPES[0]
    tokens = [_new_token(heads, kv, dim, dtype, seed=s) for s in range(steps)]
    cos_table, sin_table = rope_table(dim, 500000.0, capacity)
    eager, step = _Step(kv, capacity, dim, dtype).to(DEVICE), _Step(kv, capacity, dim, dtype).to(DEVICE)
    mode = "reduce-overhead" if DEVICE == "cuda" else None
    compiled = torch.compile(step, mode=mode, fullgraph=True)
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    codes = []
    with torch.no_grad():
        for t, (q, k, v) in enumerate(tokens):
            pos.fill_(t)
            args = [x.to(DEVICE) for x in (q, k, v, cos_table, sin_table)] + [pos]  # the tables, as the decode graph gives them
            want = eager(*args)
            if t == 0:
                got, codes = run_and_get_code(compiled, *args)
            else:
                got = compiled(*args)
            assert torch.equal(got.cpu(), want.cpu()), t
            assert torch.equal(step.k[:, :, : t + 1].cpu(), eager.k[:, :, : t + 1].cpu()), t
            assert torch.equal(step.v[:, :, : t + 1].cpu(), eager.v[:, :, : t + 1].cpu()), t
    code = "\n".join(codes)
    calls = [line for line in code.splitlines() if "ernie.rotate_write_decode_attention" in line and "(" in line]
    assert calls, code
    # the step does nothing else, so any copy in its code would be of the cache
    assert "clone" not in code and "copy_" not in code, code


def test_attention_layer_takes_the_operator_in_the_decode_step(monkeypatch):
    """model.Attention's decode-graph branch (a position tensor): the same caches, bit for bit, as
    its torch branch (RoPE in torch, index_copy_ into the cache, masked SDPA), and outputs within fp16's
    rounding of the attention (the kernel rounds the softmax weights before the product with V).
    The full model's attention shape: 20 query heads, 4 KV heads of 128."""
    import copy
    import json
    from pathlib import Path

    from ernie_cli.model.cache import LayerCache
    from ernie_cli.model.config import parse_config
    from ernie_cli.model.ernie import Attention

    raw = json.loads((Path(__file__).parent.parent / "benchmarks/configs/ERNIE-4.5-21B-A3B-Base-PT.json").read_text())
    cfg = parse_config(raw)
    torch.manual_seed(0)
    fused = Attention(cfg)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.02)
    fused = fused.to(DEVICE, torch.float16)
    plain = copy.deepcopy(fused)
    capacity = 256
    shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim)
    fused_cache, plain_cache = LayerCache(shape, torch.float16, DEVICE), LayerCache(shape, torch.float16, DEVICE)
    cos_table, sin_table = (t.to(DEVICE) for t in rope_table(cfg.head_dim, cfg.rope_theta, capacity, DEVICE))
    pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(6):
            pos.fill_(t)
            x = torch.randn(1, 1, cfg.hidden_size, generator=gen).to(DEVICE, torch.float16)
            # the whole tables, as the decode step gives them; the torch branch takes the row at pos
            monkeypatch.setattr(ops, "TRITON", True)
            monkeypatch.setattr(gpu_attention, "usable", lambda q, k: True)
            got = fused(x, cos_table, sin_table, pos, fused_cache).float().cpu()
            monkeypatch.setattr(gpu_attention, "usable", lambda q, k: False)  # the masked SDPA
            want = plain(x, cos_table, sin_table, pos, plain_cache).float().cpu()
            monkeypatch.undo()
            assert torch.equal(fused_cache.k[:, :, : t + 1].cpu(), plain_cache.k[:, :, : t + 1].cpu()), t
            assert torch.equal(fused_cache.v[:, :, : t + 1].cpu(), plain_cache.v[:, :, : t + 1].cpu()), t
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 2.0**-8 * scale, t
