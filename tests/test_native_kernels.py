"""The native kernels (ernie_cli/kernels/cpu/int_kernels.c, the AVX-512 or the AVX2 build, whichever
this CPU gets) against float64 arithmetic.

The int kernels quantize the activations to int8 per block of 64 (scale d = max|x| / 127), so each
product differs from the exact one by at most sum over blocks of d/2 * sum |w - offset| (the
rounding of each activation is at most d/2; for int4 the zero offset multiplies the exact float sum
of x, so only (q - 8) * scale counts), plus float32 summation error. The tests assert that bound, element
by element, with 1e-5 of sum |x||w| for the float32 part.
"""

import pytest
import torch
from tiny_models import native_and_torch_kl

from ernie_cli.kernels import quantized
from ernie_cli.kernels.cpu import native
from ernie_cli.kernels.ops import choose_backend
from ernie_cli.quant import formats
from ernie_cli.quant.weight import QuantWeight

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the native kernels need an x86 CPU with AVX2 and FMA (or AVX-512 VNNI) and a C compiler")


def _disk(fmt, shape, group, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return formats.quantize(fmt, w, group)


def _bound_terms(fmt, disk, group):
    """(the float64 weight, the part of it the activations' rounding multiplies)."""
    w = formats.dequantize(fmt, disk, group, torch.float64)
    if fmt == "int8":
        return w, w.abs()
    k = w.shape[-1]
    zeros = formats.expand_groups(disk["zeros"].double(), group, k)
    return w, (w - zeros).abs()


def _check(y, x, w, moving, out_rounding=0.0):
    """y [M, N] from the kernel; x [M, K]; w, moving [N, K] float64; out_rounding: relative rounding
    of the output dtype."""
    x = x.double()
    ref = x @ w.T
    blocks = x.view(x.shape[0], -1, 64)
    half_step = (blocks.abs().amax(-1) / 127 / 2)  # [M, B]
    moving_b = moving.view(moving.shape[0], -1, 64).sum(-1)  # [N, B]
    bound = (half_step @ moving_b.T + 1e-5 * (x.abs() @ w.abs().T)) * (1 + out_rounding) + out_rounding * ref.abs() + 1e-7
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # and the bound is not vacuous: it is a small fraction of the products' size
    assert bound.mean() < 0.05 * (x.abs() @ w.abs().T).mean()


@pytest.mark.parametrize("fmt, group", [("int8", 64), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("n, k", [(48, 128), (131, 256), (64, 1536)])
@pytest.mark.parametrize("m", [1, 4, 7])  # tokens are computed four at a time: 7 is a full and a partial chunk
def test_matmul_within_the_activation_rounding_bound(fmt, group, n, k, m):
    disk = _disk(fmt, (n, k), group, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :64] *= 50  # an outlier block: its own scale, the others unaffected
    kern = native.kernels()
    y = kern.int4(disk["qweight"], disk["scales"], disk["zeros"], x, group) if fmt == "int4" else kern.int8(disk["qweight"], disk["scales"], x)
    assert y.shape == (1, m, n)
    w, moving = _bound_terms(fmt, disk, group)
    _check(y[0], x, w, moving)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("n, k", [(45, 320), (6, 192), (4, 64)])  # one token: a last block of 64 columns, N % 4 != 0
def test_one_token_with_a_last_block_of_64_columns(fmt, n, k):
    disk = _disk(fmt, (n, k), 64, seed=n * k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
    x[0, -64:] *= 30  # the last block has its own scale
    kern = native.kernels()
    y = kern.int4(disk["qweight"], disk["scales"], disk["zeros"], x, 64) if fmt == "int4" else kern.int8(disk["qweight"], disk["scales"], x)
    w, moving = _bound_terms(fmt, disk, 64)
    _check(y[0], x, w, moving)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bfloat16_inputs_and_outputs(fmt):
    """The model's own dtype on the CPU goes in and out without conversions; the output is rounded once."""
    disk = _disk(fmt, (72, 320), 64, seed=11)
    x = torch.randn(5, 320, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    kern = native.kernels()
    for out_dtype, rounding in ((torch.bfloat16, 2.0**-8), (torch.float32, 0.0)):
        if fmt == "int4":
            y = kern.int4(disk["qweight"], disk["scales"], disk["zeros"], x, 64, out_dtype=out_dtype)
        else:
            y = kern.int8(disk["qweight"], disk["scales"], x, out_dtype=out_dtype)
        assert y.dtype == out_dtype
        w, moving = _bound_terms(fmt, disk, 64)
        _check(y[0], x, w, moving, out_rounding=rounding)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_selected_experts_and_per_expert_inputs(fmt):
    e_count, n, k, group = 6, 40, 192, 64
    disk = _disk(fmt, (e_count, n, k), group, seed=3)
    w, moving = _bound_terms(fmt, disk, group)
    experts = torch.tensor([4, 0, 5, 4])  # repeats allowed
    gen = torch.Generator().manual_seed(1)
    shared_x, own_x = torch.randn(2, k, generator=gen), torch.randn(len(experts), 2, k, generator=gen)
    kern = native.kernels()
    for x, per_expert in ((shared_x, False), (own_x, True)):
        if fmt == "int4":
            y = kern.int4(disk["qweight"], disk["scales"], disk["zeros"], x, group, experts, per_expert)
        else:
            y = kern.int8(disk["qweight"], disk["scales"], x, experts, per_expert)
        assert y.shape == (len(experts), 2, n)
        for p, e in enumerate(experts.tolist()):
            _check(y[p], x[p] if per_expert else x, w[e], moving[e])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [2, 5, 8])
def test_a_few_tokens_through_their_experts_in_two_calls(fmt, tokens):
    """ops.native_pairs (a server's decode batch: every (token, expert) pair in one call per
    matrix) gives each token what the one-token path gives it alone, up to the order of the float32
    sum over its experts; and both stay within the activations' rounding of float64 arithmetic on
    the dequantized weights."""
    from ernie_cli.kernels import ops

    e_count, hidden, inter, k = 7, 128, 64, 3
    gu_disk, down_disk = _disk(fmt, (e_count, 2 * inter, hidden), 64, seed=11), _disk(fmt, (e_count, hidden, inter), 64, seed=12)
    cpu = torch.device("cpu")
    gate_up = QuantWeight(fmt, (e_count, 2 * inter, hidden), 64, "native").load(gu_disk, cpu)
    down = QuantWeight(fmt, (e_count, hidden, inter), 64, "native").load(down_disk, cpu)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(e_count, generator=gen)[:k] for _ in range(tokens)])
    idx[:, 0] = 6  # one expert every token shares, as the shared experts are
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1).bfloat16()
    got = ops.native_pairs(x, weights, idx, gate_up, down)
    assert got.shape == x.shape and got.dtype == x.dtype
    w1, w2 = formats.dequantize(fmt, gu_disk, 64, torch.float64), formats.dequantize(fmt, down_disk, 64, torch.float64)
    for t in range(tokens):
        alone = ops.experts(x[t : t + 1], weights[t : t + 1], idx[t : t + 1], gate_up, down)
        torch.testing.assert_close(got[t].float(), alone[0].float(), rtol=2**-7, atol=1e-6)  # one bf16 rounding apart at most
        ref = torch.zeros(hidden, dtype=torch.float64)
        for slot in range(k):
            e = idx[t, slot]
            gate, up = (w1[e] @ x[t].double()).chunk(2)
            ref += weights[t, slot].double() * (w2[e] @ (torch.nn.functional.silu(gate) * up))
        assert (got[t].double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_quant_weight_uses_the_native_backend_where_the_shape_suits():
    cpu = torch.device("cpu")
    assert choose_backend("int4", 64, cpu, 2560) == "native"
    assert choose_backend("int8", 0, cpu, 1536) == "native"
    assert choose_backend("int4", 32, cpu, 2560) == "cpu"  # a group smaller than the activation block
    assert choose_backend("int8", 0, cpu, 24) == "cpu"  # K not a multiple of 64
    disk = _disk("int4", (3, 96, 128), 64, seed=5)
    weight = QuantWeight("int4", (3, 96, 128), 64, "native").load(disk, cpu)
    assert torch.equal(weight.qweight, disk["qweight"])  # the disk layout, no repacking
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    w, moving = _bound_terms("int4", disk, 64)
    y = quantized.matmul(weight, x, 1)
    assert y.dtype == torch.bfloat16
    _check(y, x, w[1], moving[1], out_rounding=2.0**-8)  # the bf16 output adds one rounding


def test_turned_off_or_unbuildable_falls_back_to_torch_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("ERNIE_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert choose_backend("int4", 64, torch.device("cpu"), 2560) == "cpu"
        monkeypatch.setenv("ERNIE_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        native.kernels.cache_clear()
        assert native.kernels() is None
        assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []  # no half-written library left behind
    finally:
        native.kernels.cache_clear()


def test_the_build_key_hashes_every_file_the_build_reads():
    import re

    included = re.findall(r'#include "([^"]+)"', native.SOURCE.read_text())
    assert included and {p.name for p in native.sources()} >= {native.SOURCE.name, *included}


def test_build_is_cached_under_a_content_hash(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.kernels.cache_clear()
    try:
        assert native.kernels() is not None
        folder = tmp_path / "ernie" / "kernels"
        built = list(folder.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        native.kernels.cache_clear()
        assert native.kernels() is not None
        assert [p.stat().st_mtime_ns for p in folder.iterdir()] == [stamp]  # loaded, not rebuilt
    finally:
        native.kernels.cache_clear()


def test_results_do_not_depend_on_the_thread_count():
    """Rows are split between threads, never a row's sum: any thread count gives the same bits."""
    disk = _disk("int4", (4, 600, 256), 64, seed=8)  # large enough to be split between threads
    experts = torch.tensor([3, 1])
    before = torch.get_num_threads()
    for m in (3, 1):  # several tokens, and the one-token kernel, which splits each matrix between threads
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(9))
        try:
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(native.kernels().int4(disk["qweight"], disk["scales"], disk["zeros"], x, 64, experts))
        finally:
            torch.set_num_threads(before)
        assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("fmt, group", [("int8", 64), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_the_format_definition(fmt, group, dtype):
    """The prefill expansion (Kernels.dequantize) gives exactly formats.dequantize's numbers: the same
    float32 operations in the same order, then the same round-to-nearest-even to bf16."""
    disk = _disk(fmt, (3, 131, 384), group, seed=11)
    kern = native.kernels()
    for e in (2, 0):  # an expert of the stack, and the first
        got = kern.dequantize(4 if fmt == "int4" else 8, disk["qweight"], disk["scales"], disk.get("zeros"), group, e, dtype)
        ref = formats.dequantize(fmt, {key: t[e] for key, t in disk.items()}, group, torch.float32).to(dtype)
        assert got.dtype == dtype and torch.equal(got, ref)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("threshold", [native.PREFILL_TOKENS, None])  # the AVX-512 builds', the AVX2 build's
def test_prefill_expands_to_floats_and_decode_stays_integer(fmt, threshold, monkeypatch):
    """From the build's prefill_tokens on (never where it is None), a product expands the weight
    (then torch's matmul); below, the integer kernel runs. Both give the float64 product within the
    integer path's bound."""
    disk = _disk(fmt, (96, 256), 64, seed=5)
    weight = QuantWeight(fmt, (96, 256), 64, "native").load(disk, torch.device("cpu"))
    kern = native.kernels()
    monkeypatch.setattr(kern, "prefill_tokens", threshold)
    calls = []
    for name in ("dequantize", "int4", "int8"):
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    w, moving = _bound_terms(fmt, disk, 64)
    for m in (native.PREFILL_TOKENS - 1, native.PREFILL_TOKENS, 2 * native.PREFILL_TOKENS):
        calls.clear()
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        y = quantized.matmul(weight, x)
        assert calls == (["dequantize"] if threshold is not None and m >= threshold else [fmt])
        _check(y, x, w, moving)


# ---- bf16 weights (the one-token GEMV) --------------------------------------------------------------

_needs_bf16 = pytest.mark.skipif(native.kernels() is None or not native.kernels().has_bf16,
                                 reason="this CPU's build has no bf16 GEMV (AVX-512 without AVX512_BF16), or none builds")


def _check_bf16(y, x, w, out_rounding):
    """y [N] against float64 x [K] @ w [N, K].T. bf16 x bf16 products are exact in float32. AVX-512:
    each of 16 float32 lanes adds K/32 pairs (two roundings each), then 16 lanes are summed: at most
    K/16 + 4 roundings in a chain. AVX2: each of 32 lanes adds at most 2 ceil(K/64) <= K/32 + 2
    products by FMA (one rounding each), then 32 lanes are summed: K/32 + 7. Each rounding of
    relative size 2^-24, on sum |x||w| (the standard bound gamma_n)."""
    k = x.shape[-1]
    ref = w.double() @ x.double()
    n = k / 16 + 8
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    scale = w.double().abs() @ x.double().abs()
    bound = gamma * scale * (1 + out_rounding) + out_rounding * ref.abs()
    assert ((y.double() - ref).abs() <= bound).all(), f"max excess {((y.double() - ref).abs() - bound).max().item():.3g}"
    assert bound.mean() < 0.01 * scale.mean()


@_needs_bf16
@pytest.mark.parametrize("n, k", [(37, 40), (64, 2560), (9, 100), (131, 1536)])  # K not a multiple of 32; N not of 4
def test_bf16_gemv_within_the_float32_accumulation_bound(n, k):
    gen = torch.Generator().manual_seed(n + k)
    w = (0.02 * torch.randn(n, k, generator=gen)).bfloat16()
    x = torch.randn(k, generator=gen).bfloat16()
    kern = native.kernels()
    for out_dtype, rounding in ((torch.float32, 0.0), (torch.bfloat16, 2.0**-8)):
        y = kern.bf16_gemv(w, x, out_dtype=out_dtype)
        assert y.shape == (1, n) and y.dtype == out_dtype
        _check_bf16(y[0], x, w, rounding)


@_needs_bf16
def test_bf16_gemv_selected_experts_and_per_expert_inputs():
    gen = torch.Generator().manual_seed(2)
    w = (0.02 * torch.randn(5, 24, 96, generator=gen)).bfloat16()
    experts = torch.tensor([3, 0, 3, 4])
    shared_x, own_x = torch.randn(96, generator=gen).bfloat16(), torch.randn(4, 96, generator=gen).bfloat16()
    kern = native.kernels()
    for x, per_expert in ((shared_x, False), (own_x, True)):
        y = kern.bf16_gemv(w, x, experts, per_expert, out_dtype=torch.float32)
        assert y.shape == (4, 24)
        for p, e in enumerate(experts.tolist()):
            _check_bf16(y[p], x[p] if per_expert else x, w[e], 0.0)


@_needs_bf16
def test_one_bf16_token_takes_the_native_kernel_and_many_take_torch(monkeypatch):
    from ernie_cli.kernels import ops

    kern = native.kernels()
    calls = []
    real = kern.bf16_gemv
    monkeypatch.setattr(kern, "bf16_gemv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    gen = torch.Generator().manual_seed(4)
    w = (0.02 * torch.randn(48, 256, generator=gen)).bfloat16()
    one, many = torch.randn(1, 1, 256, generator=gen).bfloat16(), torch.randn(1, 5, 256, generator=gen).bfloat16()
    y = ops.linear(one, w)
    assert calls == [1] and y.shape == (1, 1, 48) and y.dtype == torch.bfloat16
    _check_bf16(y[0, 0], one[0, 0], w, 2.0**-8)
    ops.linear(many, w)
    ops.linear(one.float(), w.float())
    assert calls == [1]  # several tokens, and float32, stay with torch
    monkeypatch.setenv("ERNIE_NATIVE", "0")
    ops.linear(one, w)
    assert calls == [1]


@_needs_bf16
def test_bf16_decode_with_the_native_kernel_stays_close_to_fp32(checkpoints, monkeypatch):
    """One-token bf16 steps (the native GEMV for every linear and the selected experts) against the
    float32 model's logits: as close as torch's bf16 matmuls get (their KL measured alike, same steps)."""
    path, _ = checkpoints("moe")
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(7))
    ours, torchs, calls = native_and_torch_kl(path, ids, monkeypatch, native.kernels(), "bf16_gemv")
    assert calls > 16 * 4  # every step's linears and experts went through the kernel
    assert ours < 1e-3 and ours <= 1.5 * torchs + 1e-5


# whether each feature set's build has a bf16 GEMV
_BF16_GEMV = {"avx512-vnni-bf16": True, "avx512-vnni": False, "avx2": True}


def test_the_build_follows_the_cpu_features(monkeypatch, tmp_path):
    """One library per feature set, named by it: AVX-512 VNNI with or without the bf16 GEMV, else AVX2
    with FMA, else none (torch's kernels). Every set this CPU can run is built here (the CPU's flags
    less those only better sets need) and checked on a few products."""
    base = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}
    assert native.feature_set(base | {"avx512_vnni", "avx512_bf16"})[0] == "avx512-vnni-bf16"
    assert native.feature_set(base | {"avx512_vnni"})[0] == "avx512-vnni"
    assert native.feature_set(base)[0] == "avx2"  # AVX-512 without VNNI (Skylake-SP)
    assert native.feature_set({"avx2", "fma", "avx_vnni"})[0] == "avx2"
    assert native.feature_set({"avx2"}) is None and native.feature_set({"avx", "fma", "f16c"}) is None
    assert set(_BF16_GEMV) == {name for name, _, _ in native.FEATURE_SETS}
    flags, model = native._cpu_flags()
    runnable = []
    for i, (name, needed, _) in enumerate(native.FEATURE_SETS):
        better = set().union(*(set(n) for _, n, _ in native.FEATURE_SETS[:i]))
        if set(needed) <= flags:
            runnable.append((name, flags - (better - set(needed))))
    assert runnable  # else the module would have been skipped
    disk4, disk8 = _disk("int4", (2, 72, 320), 64, seed=6), _disk("int8", (2, 72, 320), 64, seed=7)
    w4, moving4 = _bound_terms("int4", disk4, 64)
    w8, moving8 = _bound_terms("int8", disk8, 64)
    for name, cpu in runnable:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / name))
        monkeypatch.setattr(native, "_cpu_flags", lambda cpu=cpu: (cpu, model))
        native.kernels.cache_clear()
        try:
            kern = native.kernels()
            assert kern is not None and kern.has_bf16 == _BF16_GEMV[name]
            assert kern.expands(512) == (name != "avx2")  # without bf16 hardware the integer kernel stays faster
            assert [p.name.split("_")[3] for p in (tmp_path / name / "ernie" / "kernels").iterdir()] == [name]
            for m in (1, 5):  # the one-token and the several-token kernels
                x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m))
                _check(kern.int4(disk4["qweight"], disk4["scales"], disk4["zeros"], x, 64, torch.tensor([1]))[0], x, w4[1], moving4[1])
                _check(kern.int8(disk8["qweight"], disk8["scales"], x, torch.tensor([1]))[0], x, w8[1], moving8[1])
            wb, xb = w8[0].bfloat16(), torch.randn(320, generator=torch.Generator().manual_seed(3)).bfloat16()
            if kern.has_bf16:
                _check_bf16(kern.bf16_gemv(wb, xb, out_dtype=torch.float32)[0], xb, wb, 0.0)
            else:
                with pytest.raises(RuntimeError):
                    kern.bf16_gemv(wb, xb)
        finally:
            native.kernels.cache_clear()
