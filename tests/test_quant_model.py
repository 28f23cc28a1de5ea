"""Quantized tiny models against transformers' float32 reference, and the loading paths.

The tiny models have random weights, which makes them far touchier than trained ones (their bf16
copy alone is at KL 6e-4 from float32, against 2.5e-5 for a real 8B model in llama.cpp's table), so
the bounds below are about the formats' relative cost, not absolute quality. Measured when written
(mean KL over 4 x 64 positions, CPU kernels): moe int8 1.4e-3, int4 g32 7.2e-2, g64 9.6e-2;
dense int8 4.5e-4, int4 g32 4.4e-2, g64 5.7e-2.
"""

import pytest
import torch

from ernie_cli.kernels import ops
from ernie_cli.quant import formats
from ernie_cli.quant.convert import quantize_checkpoint
from ernie_cli.quant.spec import QuantSpec
from ernie_cli.quant.weight import QuantWeight, quantized_nbytes
from ernie_cli.weights.fuse import fuse_for_decode, shared_into_experts
from ernie_cli.weights.loader import load_model


def _ids(batch=4, n=64, seed=0):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


def _kl(p_logits, q_logits):
    return torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)


@pytest.fixture(scope="module")
def quantized(checkpoints, tmp_path_factory):
    """(shape, fmt, group) -> directory written by `ernie quantize`, made once per module."""
    cache = {}

    def get(shape, fmt, group=None, **kw):
        key = (shape, fmt, group, tuple(sorted(kw.items())))
        if key not in cache:
            src, _ = checkpoints(shape)
            out = tmp_path_factory.mktemp("q") / f"{shape}-{fmt}-{group}"
            quantize_checkpoint(src, out, QuantSpec.make(fmt, group, **kw), shard_bytes=kw.get("shard_bytes", 1 << 30))
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("shape", ["moe", "dense", "moe_wide"])
def test_quantized_logits_close_to_the_float_reference(checkpoints, quantized, shape):
    _, ref = checkpoints(shape)
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
    kl, top1 = {}, {}
    for fmt, group in (("int8", None), ("int4", 32), ("int4", 64)):
        model = load_model(quantized(shape, fmt, group), "cpu", torch.float32)
        with torch.no_grad():
            got = model(ids)
        kl[fmt, group] = _kl(expected, got).mean().item()
        top1[fmt, group] = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    # int8: a few times the bf16 copy's own KL (6.5e-4 moe, 1.4e-4 dense); int4: the 4-bit grid.
    assert kl["int8", None] < 4e-3 and top1["int8", None] >= 0.85
    for group in (32, 64):
        assert kl["int4", group] < 0.2 and top1["int4", group] >= 0.35
        # int8's weight error is ~70x smaller (rel. MSE 1e-4 vs 7e-3): its KL must be far below.
        assert kl["int8", None] * 15 < kl["int4", group]
    assert kl["int4", 32] < kl["int4", 64] * 1.05  # smaller groups are no worse


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantizing_while_loading_equals_the_offline_copy(checkpoints, quantized, fmt):
    src, _ = checkpoints("moe")
    offline = load_model(quantized("moe", fmt, 32 if fmt == "int4" else None), "cpu", torch.float32)
    online = load_model(src, "cpu", torch.float32, quantize=fmt, group_size=32 if fmt == "int4" else None)
    ids = _ids(2, 24)
    with torch.no_grad():
        assert torch.equal(offline(ids), online(ids))


@pytest.mark.parametrize("shape", ["moe_fused_names", "moe_sharded"])
def test_checkpoint_layouts_quantize_to_the_same_tensors(checkpoints, quantized, shape):
    from safetensors.torch import load_file

    def tensors(path):
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(quantized("moe", "int4", 64)), tensors(quantized(shape, "int4", 64))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", ["moe", "dense", "moe_interval2", "moe_wide"])
def test_incremental_decoding_matches_full_forward(quantized, shape, fmt):
    """Prefill, a chunk onto the cache, then one token at a time (the CPU path that touches only the
    k selected experts). The int kernels round their bf16 output per call, so the bound is on the
    distributions, not on bits: KL below 1e-4 (bf16's own cost is 6e-4)."""
    model = load_model(quantized(shape, fmt, 32 if fmt == "int4" else None), "cpu", torch.float32)
    ids = _ids(1, 20, seed=4)
    with torch.no_grad():
        full = model(ids)
        model_cache = model.new_cache(1, 32)
        parts = [model(ids[:, :8], 0, model_cache), model(ids[:, 8:13], 8, model_cache)]
        parts += [model(ids[:, p : p + 1], p, model_cache) for p in range(13, 20)]
    step = torch.cat(parts, dim=1)
    kl = _kl(full, step)
    if shape == "moe_wide":
        # The native kernels round the activations to int8 per block: a 1e-7 difference in the
        # float attention of the two paths can flip one rounding, a step of max|x|/127 in a block,
        # which in these random tiny models moves a step's KL to ~1e-4-4e-3. A cache bug gives KL ~1.
        assert kl.mean() < 1e-3 and kl.max() < 1e-2
    else:
        assert kl.max() < 1e-4
    assert (full.argmax(-1) == step.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape, backend", [("moe", "cpu"), ("moe_wide", "native")])
def test_cpu_kernels_agree_with_the_dequantize_path(quantized, monkeypatch, fmt, shape, backend):
    """ops.FORCED_QUANT_BACKEND = "dequant" runs on the CPU the code CUDA runs (dequantize, then matmul in the
    activation dtype, experts gathered by index in decode); it must agree with the int kernels up to
    their rounded activations (bf16 for torch's, int8 per block of 64 for the native ones)."""
    if backend == "native":
        _need_native()
    path = quantized(shape, fmt, 64 if fmt == "int4" else None)
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "cpu" if backend == "cpu" else "")
    kernels = load_model(path, "cpu", torch.float32)
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "dequant")
    plain = load_model(path, "cpu", torch.float32)
    assert plain.layers[1].mlp.experts.gate_up_proj.backend == "dequant"
    quant = [m for m in kernels.modules() if isinstance(m, QuantWeight)]
    if backend == "native":  # every matrix of this shape suits the native kernels
        assert {m.backend for m in quant} == {"native"}
    else:
        assert kernels.layers[1].mlp.experts.gate_up_proj.backend == "cpu"
    ids = _ids(2, 32, seed=5)
    with torch.no_grad():
        a, b = kernels(ids), plain(ids)
        # the one-token path: `selected` (`selected_native`) on the kernels, `gathered` on the dequantize path
        da, db = kernels(ids[:1, :1], 0), plain(ids[:1, :1], 0)
    # int8 activations cost about what bf16 ones do: measured on moe_wide against transformers' fp32,
    # int8 weights: KL 1.9e-3 (torch kernels, bf16 activations), 2.5e-3 (native), 1.8e-3 (dequant);
    # int4 g64: 0.132 / 0.133 / 0.133. The bf16 model alone is at 6.5e-4.
    bound = 1e-3 if backend == "cpu" else 3e-3
    assert _kl(a, b).mean() < bound
    # top-1: the bf16 model's own bound against fp32; int8 weights' bound against it (first test)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= (0.9 if backend == "cpu" else 0.85)
    assert _kl(da, db).max() < 3 * bound


def _need_native():
    from ernie_cli.kernels.cpu import native

    if native.kernels() is None:
        pytest.skip("the native kernels need an x86 CPU with AVX2 and FMA (or AVX-512 VNNI) and a C compiler")


def test_modules_are_replaced_and_bytes_match_the_disk(quantized):
    path = quantized("moe", "int4", 64)
    model = load_model(path, "cpu", torch.bfloat16)
    assert isinstance(model.embed_tokens.weight, QuantWeight)
    assert isinstance(model.layers[0].self_attn.q_proj.weight, QuantWeight)
    assert isinstance(model.layers[0].mlp.gate_up_proj.weight, QuantWeight)
    assert isinstance(model.layers[1].mlp.experts.gate_up_proj, QuantWeight)
    assert isinstance(model.layers[1].mlp.shared_experts.down_proj.weight, QuantWeight)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router is never quantized
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.norm.weight.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    assert model.quantization.format == "int4"
    assert not any(p.device.type == "meta" for p in model.parameters())
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # The runtime layout pads N to 16 and K to the group for the CPU kernel: a little over the disk size.
    assert disk * 0.9 < quantized_nbytes(model) < disk * 1.3


def test_keep_embeddings_and_untied_head(checkpoints, tmp_path):
    from tiny_models import load_reference, write_checkpoint

    src, _ = checkpoints("dense")
    out = tmp_path / "keep"
    quantize_checkpoint(src, out, QuantSpec.make("int8", keep_embeddings=True))
    model = load_model(out, "cpu", torch.float32)
    assert isinstance(model.embed_tokens.weight, torch.Tensor) and model.embed_tokens.weight.dtype == torch.float32

    untied, _ = write_checkpoint(tmp_path / "untied", "dense", tie_word_embeddings=False)
    quantize_checkpoint(untied, tmp_path / "untied-q", QuantSpec.make("int4", 32))
    model = load_model(tmp_path / "untied-q", "cpu", torch.float32)
    assert isinstance(model.lm_head.weight, QuantWeight) and model.lm_head.weight.fmt == "int8"  # the head goes to int8
    ref = load_reference(untied)
    ids = _ids(2, 32)
    with torch.no_grad():
        assert _kl(ref(ids).logits, model(ids)).mean() < 0.2


def test_memory_estimate_uses_quantized_sizes(checkpoints, quantized, monkeypatch):
    import ernie_cli.weights.loader as loader
    from ernie_cli.model.config import load_config
    from ernie_cli.quant.load import model_bytes

    src, _ = checkpoints("moe")
    cfg = load_config(src)
    q4 = model_bytes(cfg, QuantSpec.make("int4", 64), torch.bfloat16)
    assert q4 < 0.5 * loader.parameter_bytes(loader.plan(cfg, loader.Checkpoint(src)), torch.bfloat16)
    monkeypatch.setattr(loader, "available_bytes", lambda device: q4 + 1000)
    load_model(quantized("moe", "int4", 64), "cpu", torch.bfloat16)  # fits
    load_model(src, "cpu", torch.bfloat16, quantize="int4")  # fits when quantized on the way in
    monkeypatch.setattr(loader, "available_bytes", lambda device: q4 - 1000)
    with pytest.raises(loader.ErnieError, match="needs about"):
        load_model(quantized("moe", "int4", 64), "cpu", torch.bfloat16)


def test_cuda_estimate_adds_the_prefill_scratch_buffers(checkpoints):
    """Counted by hand for the tiny MoE (hidden 64, 4 heads and 2 kv heads of 16, 8 experts of 24,
    2 shared, dense layer 160): every distinct quantized shape once, in bf16 bytes."""
    from ernie_cli.model.config import load_config
    from ernie_cli.quant.load import prefill_scratch_bytes

    src, _ = checkpoints("moe")
    cfg = load_config(src)
    spec = QuantSpec.make("int4", 32)
    shapes = [
        (64, 64),  # q_proj and o_proj
        (32, 64),  # k_proj and v_proj
        (128, 64),  # q, k, v merged for the decode graph
        (320, 64), (64, 160),  # dense layer: gate_up, down
        (8, 48, 64), (8, 64, 24),  # routed experts: gate_up, down
        (96, 64), (64, 48),  # two shared experts: gate_up, down
    ]
    want = sum(torch.Size(s).numel() for s in shapes) * 2
    assert prefill_scratch_bytes(cfg, spec, torch.bfloat16, torch.device("cuda")) == want
    assert prefill_scratch_bytes(cfg, spec, torch.bfloat16, torch.device("cpu")) == 0


def test_generate_runs_on_a_quantized_model(quantized):
    from ernie_cli.runtime.generate import generate
    from ernie_cli.runtime.sampling import Sampler, SamplingParams

    model = load_model(quantized("moe", "int4", 64), "cpu", torch.bfloat16)
    sampler = Sampler(SamplingParams(temperature=0), model.config.vocab_size, model.device)
    tokens = [s.token for s in generate(model, [5, 6, 7, 8], 12, sampler)]
    assert len(tokens) == 12 and all(0 <= t < 512 for t in tokens)


def test_quantize_flag_refused_on_a_quantized_directory(quantized):
    from ernie_cli.errors import ErnieError

    with pytest.raises(ErnieError, match="already quantized"):
        load_model(quantized("moe", "int8"), "cpu", torch.float32, quantize="int4")


def test_corrupt_quantized_checkpoints_are_refused(quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from ernie_cli.errors import ErnieError

    src = quantized("moe", "int4", 64)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    state = load_file(str(bad / "model.safetensors"))
    name = "layers.2.mlp.experts.down_proj.scales"
    del state[name]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ErnieError, match=rf"tensor {name} is missing"):
        load_model(bad, "cpu", torch.float32)
    state[name] = torch.zeros(3)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ErnieError, match=rf"tensor {name} has shape \[3\]"):
        load_model(bad, "cpu", torch.float32)


def test_format_numbers_in_config_describe_the_tensors(quantized):
    import json

    from ernie_cli.weights.checkpoint import Checkpoint

    path = quantized("moe", "int4", 64)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "ernie_cli" and q["format"] == "int4" and q["group_size"] == 64
    assert q["modules"] == {"attention": "int4", "dense_mlp": "int4", "shared_experts": "int4", "experts": "int4", "embeddings": "int8"}
    assert set(q) >= {"int4", "int8", "scale_dtype", "symmetric", "bits", "format_version", "refinement"}
    t = Checkpoint(path).tensors
    assert t["layers.1.mlp.experts.gate_up_proj.qweight"].shape == (8, 48, 32)  # [E, 2I, H/2]
    assert t["layers.1.mlp.experts.gate_up_proj.scales"].shape == (8, 48, 1)
    assert t["layers.1.mlp.experts.down_proj.scales"].shape == (8, 64, 1)  # I = 24: one short group
    assert t["embed_tokens.weight.qweight"].dtype == torch.int8
    assert t["layers.1.mlp.gate.weight"].dtype == torch.float32
    assert formats.unpack_int4(torch.tensor([[0x21]], dtype=torch.uint8)).tolist() == [[1, 2]]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantizing_a_model_in_memory_equals_quantizing_while_loading(checkpoints, fmt):
    """quant.load.quantize_in_place (used by `ernie bench --config ... --quantize`) on a float model."""
    from ernie_cli.quant.load import quantize_in_place

    src, _ = checkpoints("moe")
    in_memory = quantize_in_place(load_model(src, "cpu", torch.float32), QuantSpec.make(fmt, 32))
    online = load_model(src, "cpu", torch.float32, quantize=fmt, group_size=32)
    assert isinstance(in_memory.layers[1].mlp.experts.gate_up_proj, QuantWeight) and in_memory.quantization.format == fmt
    assert not [n for n, p in in_memory.named_parameters() if p.dtype == torch.float32 and p.dim() == 3]
    ids = _ids(2, 24)
    with torch.no_grad():
        assert torch.equal(in_memory(ids), online(ids))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("backend", ["dequant", "native"])
def test_fused_qkv_of_quantized_weights_equals_the_three(quantized, monkeypatch, fmt, backend):
    """Quantized q/k/v rows stacked into one weight (QuantWeight.concatenate) give the same numbers:
    each output row is the same row of the same bytes."""
    if backend == "native":
        _need_native()
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "dequant" if backend == "dequant" else "")
    path = quantized("moe_wide", fmt, 64 if fmt == "int4" else None)
    model = load_model(path, "cpu", torch.float32)
    ids = _ids(1, 12, seed=7)
    with torch.no_grad():
        apart = model(ids)
        attn = model.layers[1].self_attn
        rows = attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
        fuse_for_decode(model)
        fused = attn.qkv_proj
        assert isinstance(fused.weight, QuantWeight) and fused.weight.backend == backend and fused.out_features == rows
        together = model(ids)
    assert (together - apart).abs().max().item() < 1e-5


def test_native_weights_stay_views_of_the_mapped_files(quantized, monkeypatch):
    """Weights the native kernels read as stored are not copied at load: their storage is the whole
    mapped file (TensorReader.map), so they cost no memory beside the page cache. Repacked ones
    (torch's kernels) are copies, and the results agree either way."""
    _need_native()
    path = quantized("moe_wide", "int4", 64)
    sizes = {f.stat().st_size for f in path.glob("*.safetensors")}
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "")
    mapped = load_model(path, "cpu", torch.float32)
    w = mapped.layers[1].mlp.experts.gate_up_proj
    assert w.backend == "native" and w.qweight.untyped_storage().nbytes() in sizes
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "cpu")
    copied = load_model(path, "cpu", torch.float32)
    assert copied.layers[1].mlp.experts.gate_up_proj.packed.untyped_storage().nbytes() not in sizes
    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "dequant")
    plain = load_model(path, "cpu", torch.float32)
    ids = _ids(1, 8, seed=9)
    with torch.no_grad():
        assert _kl(plain(ids), mapped(ids)).mean() < 3e-3


def test_compiled_cpu_decode_keeps_the_native_kernels(quantized, monkeypatch):
    """`--compile on` on the CPU: the native kernels stay in the compiled step as one operator each
    (native.int_matmul), instead of the slow dequantize-and-reduce form, and decode the same."""
    _need_native()
    from ernie_cli.kernels.cpu import native
    from ernie_cli.runtime.decoder import Decoder

    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "")
    model = load_model(quantized("moe_wide", "int4", 64), "cpu", torch.float32)
    ids = _ids(1, 12, seed=3)
    calls = []
    real = native.kernels().int4
    monkeypatch.setattr(native.kernels(), "int4", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with torch.no_grad():
        compiled = Decoder(model, "compile")
        cache = compiled.reserve(16)
        model(ids[:, :4], 0, cache)
        eager = [model(ids[:, p : p + 1], p, cache)[:, -1] for p in range(4, 12)]
        calls.clear()
        steps = [compiled(ids[:, p : p + 1], p) for p in range(4, 12)]
    assert len(calls) >= 8 * 4  # every layer's int4 products went through the native kernel
    kl = torch.stack([_kl(a, b) for a, b in zip(eager, steps)])
    assert kl.max() < 1e-3  # int8 activation rounding may flip where Inductor's norms round differently


def test_a_file_that_cannot_be_mapped_is_read(quantized, monkeypatch):
    """Where mapping fails (some network file systems), loading reads the tensors instead."""
    _need_native()

    def refuse(*args, **kwargs):
        raise RuntimeError("mmap failed")

    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "")
    monkeypatch.setattr(torch, "from_file", refuse)
    path = quantized("moe_wide", "int4", 64)
    model = load_model(path, "cpu", torch.float32)
    w = model.layers[1].mlp.experts.gate_up_proj.qweight
    assert w.untyped_storage().nbytes() == w.numel()  # its own buffer
    with torch.no_grad():
        assert torch.isfinite(model(_ids(1, 4), 0)).all()


@pytest.mark.parametrize("shape, fmt, group", [("moe", "int8", None), ("moe_wide", "int8", None), ("moe_wide", "int4", 64), ("moe_wide", "int4", 32)])
def test_shared_experts_moved_into_the_quantized_stack(quantized, monkeypatch, shape, fmt, group):
    """fuse.shared_into_experts on the disk layout CUDA holds (ops.FORCED_QUANT_BACKEND = "dequant"): codes,
    scales and zeros split by rows (gate_up) and by columns (down), in float32, must give what the
    separate shared MLP gives, through prefill and the one-token gathered path. A split that mixed
    up rows, nibbles or scale groups would move logits by far more than the summation order does."""
    from ernie_cli.model.ernie import MoE

    monkeypatch.setattr(ops, "FORCED_QUANT_BACKEND", "dequant")
    path = quantized(shape, fmt, group)
    plain, fused = load_model(path, "cpu", torch.float32), load_model(path, "cpu", torch.float32)
    moes = [layer.mlp for layer in fused.layers if isinstance(layer.mlp, MoE)]
    for moe in moes:
        shared = moe.shared_experts.down_proj.in_features // moe.experts.down_proj.shape[-1]
        assert shared_into_experts(moe)
        assert moe.shared_experts is None and moe.experts.down_proj.shape[0] == moe.gate.weight.shape[0] + shared
    ids = _ids(2, 32, seed=6)
    with torch.no_grad():
        a, b = plain(ids), fused(ids)
        da, db = plain(ids[:1, :1], 0), fused(ids[:1, :1], 0)
    assert (a - b).abs().max().item() < 1e-4
    assert (da - db).abs().max().item() < 1e-4
