"""The native one-token operations around the products (RMSNorm, RoPE with the cache write and the
attention, the router; ernie_cli/kernels/cpu/int_kernels.c) against float64 arithmetic, with the
bounds that bf16's roundings allow (2^-8 relative per rounding), and the model's bf16 decode through
them against float32.
"""

import math

import pytest
import torch
from tiny_models import native_and_torch_kl

from ernie_cli.kernels import ops
from ernie_cli.kernels.cpu import native

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the native kernels need an x86 CPU with AVX2 and FMA (or AVX-512 VNNI) and a C compiler")

ULP = 2.0**-8  # bf16's relative rounding


def _rope64(t, cos, sin):
    """Interleaved pairs in float64: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    t = t.double()
    rot = torch.stack((-t[..., 1::2], t[..., 0::2]), -1).flatten(-2)
    return t * cos.double() + rot * sin.double()


@pytest.mark.parametrize("rows, n", [(1, 2560), (3, 100), (7, 64)])
def test_rms_norm_within_two_bf16_roundings_of_float64(rows, n):
    gen = torch.Generator().manual_seed(rows * n)
    x = (3 * torch.randn(rows, n, generator=gen)).bfloat16()
    w = (1 + 0.3 * torch.randn(n, generator=gen)).bfloat16()
    y = native.kernels().rms_norm(x, w, 1e-5)
    x64 = x.double()
    h = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = w.double() * h
    # h is rounded to bf16, then the product: at most 2 ulps of the product's size
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert ((y.double() - ref).abs() <= 2.01 * ULP * ref.abs() + 1e-30).all()


@pytest.mark.parametrize("heads, kv_heads, d, pos", [(20, 4, 128, 0), (20, 4, 128, 37), (4, 4, 64, 5), (6, 2, 32, 200)])
def test_decode_attention_rotates_writes_and_attends_like_float64(heads, kv_heads, d, pos):
    gen = torch.Generator().manual_seed(heads + d + pos)
    capacity = pos + 3
    q = torch.randn(heads, d, generator=gen).bfloat16()
    k = torch.randn(kv_heads, d, generator=gen).bfloat16()
    v = torch.randn(kv_heads, d, generator=gen).bfloat16()
    cache_k = torch.randn(kv_heads, capacity, d, generator=gen).bfloat16()
    cache_v = torch.randn(kv_heads, capacity, d, generator=gen).bfloat16()
    older_k, older_v = cache_k[:, :pos].double(), cache_v[:, :pos].double()
    angle = pos * (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = angle.cos().repeat_interleave(2).float(), angle.sin().repeat_interleave(2).float()
    scale = d**-0.5

    out = native.kernels().decode_attention(q, k, v, cache_k, cache_v, cos, sin, pos, scale)

    k_rot = _rope64(k, cos, sin)
    assert ((cache_k[:, pos].double() - k_rot).abs() <= ULP * k_rot.abs() + 1e-30).all()  # one rounding
    assert torch.equal(cache_v[:, pos], v)
    keys = torch.cat([older_k, k_rot[:, None]], 1)  # [KV, pos + 1, d]
    values = torch.cat([older_v, v.double()[:, None]], 1)
    group = heads // kv_heads
    q_rot = _rope64(q, cos, sin).view(kv_heads, group, d)
    probs = torch.softmax(q_rot @ keys.transpose(1, 2) * scale, -1)
    ref = (probs @ values).reshape(heads, d)
    # q and k enter rounded to bf16 (a relative 2^-8 each on every score), the output is rounded once
    score_err = 2 * ULP * (q_rot.abs() @ keys.abs().transpose(1, 2)).amax() * scale
    bound = (math.exp(2 * score_err) - 1) * (probs @ values.abs()).reshape(heads, d) + ULP * ref.abs() + 1e-6
    assert out.shape == (heads, d) and out.dtype == torch.bfloat16
    err = (out.double() - ref).abs()
    assert (err <= bound).all()
    # the bound allows for every rounding at its worst; the typical error is a few roundings
    assert err.mean() <= 4 * ULP * ref.abs().mean(), err.mean() / ref.abs().mean()


@pytest.mark.parametrize("always", [0, 2])
def test_router_picks_and_weighs_like_float64(always):
    experts, hidden, top_k, norm_min = 64, 512, 6, 1e-12
    kern = native.kernels()
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(hidden, generator=gen).bfloat16()
        w = 0.05 * torch.randn(experts, hidden, generator=gen)
        bias = 0.01 * torch.randn(experts, generator=gen)
        weights, idx = kern.route(x, w, bias, top_k, norm_min, always)
        probs = torch.softmax(w.double() @ x.double(), -1)
        score = probs + bias.double()
        order = torch.argsort(score, descending=True)
        if (score[order[top_k - 1]] - score[order[top_k]]).abs() < 1e-6:
            continue  # a near tie: float32 may pick either
        chosen = order[:top_k]
        assert idx[0, :top_k].tolist() == chosen.tolist()  # in descending order of probability + bias
        ref = probs[chosen] / probs[chosen].sum().clamp(min=norm_min)
        assert ((weights[0, :top_k].double() - ref).abs() <= ULP * ref + 1e-6).all()
        assert idx[0, top_k:].tolist() == list(range(experts, experts + always))
        assert weights[0, top_k:].tolist() == [1.0] * always


def test_one_bf16_token_takes_the_native_operations_and_float32_does_not(monkeypatch):
    kern = native.kernels()
    calls = []
    for name in ("rms_norm", "decode_attention", "route"):
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 64, generator=gen), torch.ones(64)
    ops.rms_norm(x, w, 1e-5)
    assert calls == []  # float32 keeps torch's arithmetic, the one the transformers parity is measured on
    ops.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)
    ops.route(x[0].bfloat16(), torch.randn(8, 64, generator=gen), torch.zeros(8), 2, 1e-12)
    assert calls == ["rms_norm", "route"]
    monkeypatch.setenv("ERNIE_NATIVE", "0")
    ops.rms_norm(x.bfloat16(), w.bfloat16(), 1e-5)
    assert calls == ["rms_norm", "route"]


def test_bf16_decode_through_the_native_operations_stays_as_close_to_fp32_as_torchs(checkpoints, monkeypatch):
    """Steps of the tiny MoE model in bf16 (the native norms, attention and router on every one)
    against the float32 model's logits; the same steps with ERNIE_NATIVE=0 (torch's bf16 arithmetic)
    give the yardstick."""
    path, _ = checkpoints("moe")
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(11))
    ours, torchs, calls = native_and_torch_kl(path, ids, monkeypatch, native.kernels(), "decode_attention")
    assert calls >= 16  # every step's attention went through it
    assert ours < 1e-3 and ours <= 1.5 * torchs + 1e-5
