"""float32 logits and greedy tokens against transformers' eager implementation."""


import pytest
import torch
from tiny_models import SHAPES

from ernie_cli.kernels import ops
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.fuse import fuse_for_decode, shared_into_experts
from ernie_cli.weights.loader import load_model

TOL = 1e-4


def _prompt(n=17, seed=3, batch=1):
    return torch.randint(3, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_forward_logits_match_transformers(checkpoints, shape):
    path, ref = checkpoints(shape)
    ours = load_model(path, "cpu", torch.float32)
    ids = _prompt(batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_checkpoint_layouts_really_differ(checkpoints):
    """The hub layout stores one tensor per expert; the fused one stacks them (guards the fixtures)."""
    from ernie_cli.weights.checkpoint import Checkpoint

    hub = Checkpoint(checkpoints("moe")[0]).tensors
    fused = Checkpoint(checkpoints("moe_fused_names")[0]).tensors
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in hub
    assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in hub
    assert "model.layers.1.mlp.experts.gate_up_proj" in fused
    assert "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias" in fused
    sharded = Checkpoint(checkpoints("moe_sharded")[0])
    assert len(sharded.files) > 2


def test_correction_bias_is_nonzero_and_matters(checkpoints):
    """A zeroed bias must change the logits; otherwise the bias tests above prove nothing."""
    path, ref = checkpoints("moe")
    ours = load_model(path, "cpu", torch.float32)
    bias = ours.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0
    ids = _prompt()
    with torch.no_grad():
        before = ours(ids)
        for layer in ours.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        after = ours(ids)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("shape", ["dense", "moe", "moe_interval2"])
def test_incremental_decoding_matches_full_forward(checkpoints, shape):
    path, _ = checkpoints(shape)
    model = load_model(path, "cpu", torch.float32)
    ids = _prompt(n=20)
    with torch.no_grad():
        full = model(ids)
        model_cache = model.new_cache(1, 32)
        parts = [model(ids[:, :8], 0, model_cache)]  # prefill
        parts.append(model(ids[:, 8:13], 8, model_cache))  # a chunk onto a filled cache
        for p in range(13, 20):  # one token at a time
            parts.append(model(ids[:, p : p + 1], p, model_cache))
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < TOL


def test_gathered_and_grouped_expert_paths_agree(checkpoints):
    """The graph-safe decode path (used on CUDA) against the grouped one, on CPU."""
    path, _ = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    moe = model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, idx = moe.gate(x)
        a = ops.gathered(x, w, idx, moe.experts.gate_up_proj, moe.experts.down_proj)
        b = ops.grouped(x, w, idx, moe.experts.gate_up_proj, moe.experts.down_proj)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [2, 9, 40])
def test_grouped_mm_prefill_path_agrees_in_bf16(checkpoints, tokens):
    """The GPU prefill path (two grouped GEMMs) against the per-expert loop, both in bf16 on CPU.
    Two tokens leave experts without tokens: their groups must be empty, not shifted."""
    if ops.GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    path, _ = checkpoints("moe")
    moe = load_model(path, "cpu", torch.bfloat16).layers[1].mlp
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        w, idx = moe.gate(x)
        a = ops.grouped(x, w, idx, moe.experts.gate_up_proj, moe.experts.down_proj).float()
        b = ops.grouped_mm(x, w, idx, moe.experts.gate_up_proj, moe.experts.down_proj).float()
    assert (a - b).abs().max().item() < 2 ** -7 * a.abs().max().item()  # a few bf16 roundings apart


@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("shape", ["dense", "moe", "moe_no_shared", "moe_fused_names"])
def test_greedy_32_tokens_identical_to_transformers_generate(checkpoints, shape, penalty):
    """Tiny random tied-embedding models tend to repeat one token under plain greedy decoding, so
    a second run adds transformers' repetition penalty on both sides to get a varied sequence."""
    path, ref = checkpoints(shape)
    ids = _prompt(n=9, seed=11)
    with torch.no_grad():
        out = ref.generate(
            ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, repetition_penalty=penalty,
            eos_token_id=None, pad_token_id=0,
        )
    expected = out[0, ids.shape[1]:].tolist()
    model = load_model(path, "cpu", torch.float32)
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=penalty), model.config.vocab_size, model.device)
    got = [s.token for s in generate(model, ids[0].tolist(), 32, sampler)]
    assert got == expected
    if penalty > 1:
        assert len(set(expected)) > 8  # a sequence that varies, not one token repeated


def _kl(p_logits, q_logits):
    return torch.nn.functional.kl_div(
        q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


def test_bf16_close_to_fp32_reference(checkpoints):
    """bf16 against the float32 reference, judged by what bf16 costs transformers itself.

    Tolerances: mean KL(fp32 || bf16) below 1e-3 nats and top-1 agreement of at least 90% over 256
    positions, and no more than 1.5x the KL of transformers' own bf16 run on the same checkpoint
    (measured when written: ours 2.9e-4, transformers 2.8e-4, top-1 95% vs 96%).
    """
    from transformers import AutoModelForCausalLM

    path, ref = checkpoints("moe")
    model = load_model(path, "cpu", torch.bfloat16)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ref_bf16 = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager"
    )
    ids = _prompt(n=64, batch=4)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).float()
        theirs = ref_bf16(ids).logits.float()
    ours_kl, their_kl = _kl(expected, got).mean().item(), _kl(expected, theirs).mean().item()
    assert ours_kl < 1e-3
    assert ours_kl <= 1.5 * their_kl + 1e-5
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_shared_experts_stay_apart_in_a_stack_split_over_ranks():
    """One rank's stack holds some experts and sums only the slots routed to them (ops.owned_experts),
    so shared experts appended to it would be dropped: the fusion refuses, the MLP stays."""
    from tiny_models import BASE, MOE

    from ernie_cli.model.config import parse_config
    from ernie_cli.model.ernie import MoE
    from ernie_cli.parallel.group import Group
    from ernie_cli.parallel.shard import plan_shard
    from ernie_cli.weights.loader import random_model

    cfg = parse_config({**BASE, **MOE, "architectures": ["Ernie4_5_MoeForCausalLM"]})
    model = random_model(cfg, "cpu", torch.float32, shard=plan_shard(cfg, Group(rank=0, world=2)))
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE))
    assert moe.experts.owned is not None and moe.shared_experts is not None
    assert not shared_into_experts(moe) and moe.shared_experts is not None and moe.gate.always == 0


@pytest.mark.parametrize("shape", ["dense", "moe"])
def test_fused_qkv_projection_matches_transformers(checkpoints, shape):
    """The decode graph's one q/k/v matrix (fuse.fuse_qkv) computes what the three did."""
    path, ref = checkpoints(shape)
    ours = load_model(path, "cpu", torch.float32)
    before = sum(p.numel() for p in ours.parameters())
    fuse_for_decode(ours)
    attn = ours.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert sum(p.numel() for p in ours.parameters()) == before  # moved, not copied
    ids = _prompt(batch=2)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("shape", ["moe", "moe_wide"])
def test_shared_experts_moved_into_the_expert_stack_match_transformers(checkpoints, shape):
    """fuse.shared_into_experts, which the CUDA decode graph uses, run here in float32: the shared MLP
    split into num_shared more experts that every token takes must give transformers' logits, through
    the grouped expert path (prefill) and the gathered one (the decode graph's)."""
    from ernie_cli.model.ernie import MoE

    path, ref = checkpoints(shape)
    ours = load_model(path, "cpu", torch.float32)
    plain = load_model(path, "cpu", torch.float32)
    moes = [layer.mlp for layer in ours.layers if isinstance(layer.mlp, MoE)]
    for moe in moes:
        assert shared_into_experts(moe)
        assert moe.shared_experts is None and moe.experts.gate_up_proj.shape[0] == moe.gate.weight.shape[0] + 2 and moe.gate.always == 2
    ids = _prompt(batch=2)
    x = torch.randn(1, ours.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < TOL
        stack = moes[0].experts
        stack.forward = lambda x, w, i: ops.gathered(x, w, i, stack.gate_up_proj, stack.down_proj)
        assert (moes[0](x[None]) - plain.layers[1].mlp(x[None])).abs().max().item() < 1e-5


def test_router_logits_as_a_sum_in_the_compiled_step_match_transformers(checkpoints, monkeypatch):
    """The CUDA decode graph takes the router's logits as a product and a
    sum, which Inductor makes one kernel) instead of F.linear. Here that branch is forced on the CPU,
    compiled as on CUDA: teacher-forced one-token steps must give transformers' logits within TOL."""
    from ernie_cli.runtime.decoder import Decoder

    path, ref = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    monkeypatch.setattr(ops, "logits_as_sum", lambda x: x.shape[0] == 1 and torch.compiler.is_compiling())
    ids = _prompt(n=12)
    with torch.no_grad():
        expected = ref(ids).logits[0]
        decoder = Decoder(model, "compile")
        model(ids[:, :4], 0, decoder.reserve(16))
        steps = torch.stack([decoder(ids[:, p : p + 1], p).reshape(-1) for p in range(4, 12)])
    assert (steps - expected[4:12]).abs().max().item() < TOL


@pytest.mark.parametrize("dtype, eps", [(torch.float32, 1e-6), (torch.bfloat16, 2.0**-8)])
def test_selected_experts_are_weighed_and_added_once_rounded(dtype, eps):
    """run_selected, the one-token expert path of the CUDA decode graph and the native CPU kernels,
    weighs and adds a token's 8 expert outputs in float32 (one product eagerly; one addition at a
    time when compiled, so that Inductor can fold them into the next norm's kernel) and rounds once:
    float64 of the same outputs and weights, within the output dtype's rounding."""
    from ernie_cli.kernels.ops import run_selected

    gen = torch.Generator().manual_seed(5)
    h, e, k = 96, 10, 8
    w1, w2 = torch.randn(e, 64, h, generator=gen), torch.randn(e, h, 32, generator=gen)
    x = torch.randn(1, h, generator=gen).to(dtype)
    weights = torch.rand(1, k, generator=gen).to(dtype)
    idx = torch.randperm(e, generator=gen)[:k][None]
    gate_up = lambda v, ex: (w1[ex].to(dtype) @ v)  # noqa: E731
    down = lambda g, ex: torch.bmm(w2[ex].to(dtype), g[:, :, None])[:, :, 0]  # noqa: E731
    got = run_selected(x, weights, idx, gate_up, down)
    gate, up = gate_up(x[0], idx[0]).chunk(2, dim=-1)
    y = down((torch.nn.functional.silu(gate) * up).contiguous(), idx[0]).double()
    want = (y * weights[0, :, None].double()).sum(0, keepdim=True)
    assert got.dtype == dtype and got.shape == (1, h)
    assert ((got.double() - want).abs() <= eps * want.abs() + 1e-5 * (y.abs() * weights[0, :, None].double()).sum(0)).all()


def test_one_token_bf16_attention_against_float64():
    """The CPU's one-token bf16 attention (each KV head's query heads as rows of one call) against
    float64 softmax attention with each query head on its KV head (head h on h // (H / KV)), within
    bf16 rounding of the inputs' scale; and the cache holds the new key and value."""
    gen = torch.Generator().manual_seed(3)
    b, h, kv, d, filled = 2, 6, 2, 32, 9
    cache_k = torch.zeros(b, kv, 16, d, dtype=torch.bfloat16)
    cache_v = torch.zeros_like(cache_k)
    cache_k[:, :, :filled] = torch.randn(b, kv, filled, d, generator=gen).bfloat16()
    cache_v[:, :, :filled] = torch.randn(b, kv, filled, d, generator=gen).bfloat16()
    q, k, v = (torch.randn(b, 1, n, d, generator=gen).bfloat16() for n in (h, kv, kv))
    cos, sin = torch.ones(1, d), torch.zeros(1, d)  # no rotation: the reference needs none
    out = ops.attention(q, k, v, cache_k, cache_v, cos, sin, filled, d**-0.5)
    assert out.shape == (b, 1, h * d)
    assert torch.equal(cache_k[:, :, filled], k[:, 0]) and torch.equal(cache_v[:, :, filled], v[:, 0])
    keys, values = cache_k[:, :, : filled + 1].double(), cache_v[:, :, : filled + 1].double()
    heads = torch.arange(h) // (h // kv)
    scores = torch.einsum("bhd,bhsd->bhs", q[:, 0].double(), keys[:, heads]) * d**-0.5
    want = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), values[:, heads]).reshape(b, 1, h * d)
    assert (out.double() - want).abs().max().item() < 2**-7
