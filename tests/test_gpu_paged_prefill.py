"""The prompt chunks of a mixed batch step on CUDA: kernels/triton/paged.prefill against float64
arithmetic, and the engine's steps through it against the same steps through the loop of SDPA
calls it replaces. On the GPU: `pytest tests/test_gpu_paged_prefill.py`. The kernel test also runs
under Triton's interpreter on the CPU (`DEVICE=cpu TRITON_INTERPRET=1`, float16 only: its numpy has
no bf16), where the interpreter takes a loop bound read from memory (Triton 3.6's fails on it with
NumPy 2)."""

import os

import pytest
import torch
from tiny_models import write_checkpoint

from ernie_cli.kernels.triton import paged as gpu_paged
from ernie_cli.model.cache import PagedChunks

DEVICE = os.environ.get("DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    gpu_paged.triton is None or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with DEVICE=cpu)",
)

BLOCK = 16


@pytest.mark.parametrize("heads, kv, dim", [(20, 4, 128), (8, 2, 64), (4, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_kernel_against_float64(heads, kv, dim, dtype):
    """Five chunks: whole prompts from position 0 (37 tokens, 5, 1) and continuations of prompts
    already partly in the cache (1 token at 16, 70 at 100: several programs and stretches), their
    sequences' blocks scattered through the pool. Slots no chunk has reached hold NaN, so a kernel
    that reads past a token's own position fails; groups of 5, 4 and 1 query heads per KV head."""
    if DEVICE != "cuda" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's numpy has no bf16: GPU only")
    gen = torch.Generator().manual_seed(heads * dim)
    chunks = [(0, 37), (16, 1), (100, 70), (0, 5), (0, 1)]  # (first position, tokens)
    blocks = 64
    order = torch.randperm(blocks, generator=gen).tolist()
    tables, taken = [], 0
    for start, t in chunks:
        need = -(-(start + t) // BLOCK)
        tables.append(order[taken : taken + need])
        taken += need
    pool_k = torch.full((blocks * BLOCK, kv, dim), float("nan"), dtype=dtype)
    pool_v = pool_k.clone()
    seq_k, seq_v = [], []
    for (start, t), table in zip(chunks, tables):  # positions up to the chunk's last are in the pool
        slots = (torch.tensor(table)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[: start + t]
        keys, values = torch.randn(start + t, kv, dim, generator=gen).to(dtype), torch.randn(start + t, kv, dim, generator=gen).to(dtype)
        pool_k[slots], pool_v[slots] = keys, values
        seq_k.append(keys.double())
        seq_v.append(values.double())
    n = sum(t for _, t in chunks)
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    meta = PagedChunks([t for _, t in chunks], [s for s, _ in chunks], tables, BLOCK, 16, DEVICE)
    out = gpu_paged.prefill(q.to(DEVICE), pool_k.to(DEVICE), pool_v.to(DEVICE), meta, scale)
    out = out.view(n, heads, dim).double().cpu()

    group, row = heads // kv, 0
    for c, (start, t) in enumerate(chunks):
        for i in range(t):
            pos = start + i
            for h in range(heads):
                keys, values = seq_k[c][: pos + 1, h // group], seq_v[c][: pos + 1, h // group]
                weights = torch.softmax(keys @ q[row, h].double() * scale, 0)
                ref, spread = weights @ values, weights @ values.abs()
                eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
                bound = eps * (spread + ref.abs()) + 1e-5  # p rounded to 16 bits before its product with v
                assert ((out[row, h] - ref).abs() <= bound).all(), (c, i, h)
            row += 1


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_steps_through_the_kernel_equal_the_loop(tmp_path, monkeypatch):
    """bf16 MoE, head size 64: four sequences, prompts read in chunks of at most 8 tokens beside the
    others' decoding (every step but the last ones mixed, chunks starting at 0 and past it). The
    steps through the kernel give the tokens of the steps through the loop of SDPA calls, and
    logprobs within bf16's rounding (the kernel sums in another order)."""
    from test_gpu_paged import LENGTHS, PROMPTS, _run

    from ernie_cli.runtime import batch as batch_module
    from ernie_cli.runtime.batch import BatchDecoder
    from ernie_cli.weights.loader import load_model, prepare_for_decoding

    path, _ = write_checkpoint(tmp_path / "m", "moe", head_dim=64)
    model = prepare_for_decoding(load_model(path, "cuda", torch.bfloat16), "graph")
    runs = []
    for kernel in (True, False):
        if not kernel:  # no block tables: ops.ragged_attention takes its loop
            monkeypatch.setattr(batch_module, "PagedChunks", lambda *a, **k: None)
        engine = BatchDecoder(model, 4096, 512, graphs=False)
        engine.step_tokens = 8
        runs.append(_run(engine, PROMPTS, LENGTHS, late=3))
    (k_tokens, k_lps), (l_tokens, l_lps) = runs
    assert k_tokens == l_tokens
    assert max(abs(a - b) for g, e in zip(k_lps, l_lps) for a, b in zip(g, e)) < 5e-2
