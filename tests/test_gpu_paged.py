"""The batch engine's decode-only step on CUDA: the paged attention kernel (kernels/triton/paged.py)
against float64 arithmetic, and the step's CUDA graphs per batch bucket (runtime/batch.DecodeGraphs)
against the same sequences run alone.

Skipped without CUDA; run on the GPU machine with `pytest tests/test_gpu_paged.py`.
"""

import pytest
import torch
from tiny_models import write_checkpoint

from ernie_cli.kernels import ops
from ernie_cli.kernels.triton import paged as gpu_paged
from ernie_cli.model.cache import PagedDecode
from ernie_cli.model.ernie import rope_table
from ernie_cli.runtime.batch import BatchDecoder, Sequence
from ernie_cli.runtime.sampling import SamplingParams
from ernie_cli.weights.loader import load_model, prepare_for_decoding

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_paged.triton is not None), reason="needs a CUDA GPU and Triton")

BLOCK = 16


@pytest.mark.parametrize("heads, kv, dim", [(20, 4, 128), (8, 2, 64)])
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_paged_kernel_against_float64(heads, kv, dim, splits, monkeypatch):
    """Five sequences at positions 0, 15, 16, 63 and 300, their blocks scattered through the pool;
    q/k/v are views into one fused product, as the projection leaves them; each (sequence, KV head)
    in one program or in stretches weighed by a second kernel. Unfilled slots hold NaN, so a kernel
    that reads one fails."""
    monkeypatch.setattr(gpu_paged, "splits_for", lambda b, kv: splits)
    gen = torch.Generator().manual_seed(dim)
    positions = [0, 15, 16, 63, 300]
    blocks = 64
    order = torch.randperm(blocks, generator=gen).tolist()
    tables, taken = [], 0
    for p in positions:
        need = p // BLOCK + 1
        tables.append(order[taken : taken + need])
        taken += need
    width = max(len(t) for t in tables)
    pool_k = torch.full((blocks * BLOCK, kv, dim), float("nan"), dtype=torch.bfloat16)
    pool_v = pool_k.clone()
    for p, table in zip(positions, tables):  # positions before p are filled
        slots = (torch.tensor(table)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:p]
        pool_k[slots] = torch.randn(p, kv, dim, generator=gen).bfloat16()
        pool_v[slots] = torch.randn(p, kv, dim, generator=gen).bfloat16()
    b = len(positions)
    fused = torch.randn(1, b, (heads + 2 * kv) * dim, generator=gen).bfloat16()
    q, k, v = fused.split([heads * dim, kv * dim, kv * dim], dim=-1)
    q, k, v = q.view(1, b, heads, dim), k.view(1, b, kv, dim), v.view(1, b, kv, dim)
    cos, sin = rope_table(dim, 500000.0, 512)
    new_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p, table in zip(positions, tables)]
    scale = dim**-0.5

    cuda_k, cuda_v = pool_k.cuda(), pool_v.cuda()
    batch = PagedDecode(torch.tensor(positions, device="cuda"), torch.tensor(new_slots, device="cuda"),
                        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda"), BLOCK)
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    assert gpu_paged.usable(qc, cuda_k)
    out = gpu_paged.decode(qc, kc, vc, cuda_k, cuda_v, cos.cuda(), sin.cuda(), batch, scale).view(b, heads, dim).double().cpu()

    rows = torch.tensor(positions)
    q_rot = ops.rope_in_torch(q, cos[rows], sin[rows])[0]  # torch's roundings, in bf16
    k_rot = ops.rope_in_torch(k, cos[rows], sin[rows])[0]
    group = heads // kv
    for i, (p, table) in enumerate(zip(positions, tables)):
        assert torch.equal(cuda_k[new_slots[i]].cpu(), k_rot[i]) and torch.equal(cuda_v[new_slots[i]].cpu(), v[0, i])
        slots = (torch.tensor(table)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[: p + 1]
        keys, values = pool_k[slots].double(), pool_v[slots].double()
        keys[p], values[p] = k_rot[i].double(), v[0, i].double()
        for h in range(heads):
            weights = torch.softmax(keys[:, h // group] @ q_rot[i, h].double() * scale, 0)
            ref, spread = weights @ values[:, h // group], weights @ values[:, h // group].abs()
            bound = 2.0**-8 * (spread + ref.abs()) + 1e-5
            assert ((out[i, h] - ref).abs() <= bound).all(), (i, h)


def _run(engine: BatchDecoder, prompts: list[list[int]], lengths: list[int], late: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy, stepped until each sequence has its length: (tokens, logprobs). Every sequence is
    admitted at once, or with late=S the last one only after S steps (it joins a running batch,
    so a decode step queued ahead for the others is dropped)."""
    seqs = [Sequence(p, n, SamplingParams(temperature=0), logprobs=0) for p, n in zip(prompts, lengths)]
    waiting = seqs[-1:] if late is not None else []
    for seq in seqs[: len(seqs) - len(waiting)]:
        assert engine.admit(seq)
    logprobs: list[list[float]] = [[] for _ in seqs]
    live = [i for i, seq in enumerate(seqs) if seq.blocks]
    steps = 0
    while live or waiting:
        if waiting and steps == late:
            assert engine.admit(waiting.pop())
            live.append(len(seqs) - 1)
        out = engine.step([seqs[i] for i in live])
        steps += 1
        for j, o in out.items():
            if o.step is not None:
                logprobs[live[j]].append(o.step.logprob)
        for i in live:
            if not seqs[i].reading and len(seqs[i].generated) >= seqs[i].max_new:
                engine.release(seqs[i])
        live = [i for i in live if seqs[i].blocks]
    return [s.generated for s in seqs], logprobs


PROMPTS = [[5, 9, 33, 7], [100, 3, 8, 250, 17, 4, 99, 12, 61, 70, 18], [42], [7, 7, 7, 7, 300, 301, 302, 5, 5, 41, 8, 9, 10, 11, 12, 13, 14, 15]]
LENGTHS = [20, 9, 40, 27]  # the batch shrinks 4 -> 3 -> 2 -> 1: four buckets


def test_graphs_in_float32_equal_each_sequence_alone(tmp_path):
    """float32 (a dense model: a batch's experts in float32 wait for the host, and are not
    captured; attention in the torch form; TF32 off): the graphs give each sequence the tokens and
    logprobs it gets alone in the eager engine, through buckets 4, 3->4, 2 and 1, with the steps
    queued ahead of their batch."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path, _ = write_checkpoint(tmp_path / "m", "dense")
    model = prepare_for_decoding(load_model(path, "cuda", torch.float32), "graph")
    engine = BatchDecoder(model, 4096, 512)
    assert engine.graphs is not None
    tokens, logprobs = _run(engine, PROMPTS, LENGTHS)
    assert not engine.graphs.failed and {1, 2, 4} <= set(engine.graphs.graphs)
    for prompt, n, got, lps in zip(PROMPTS, LENGTHS, tokens, logprobs):
        alone_tokens, alone_lps = _run(BatchDecoder(model, 4096, 512, graphs=False), [prompt], [n])
        assert got == alone_tokens[0]
        assert max(abs(a - b) for a, b in zip(lps, alone_lps[0])) < 1e-4


def test_splits_fill_the_gpu_for_small_batches():
    assert [gpu_paged.splits_for(b, 4) for b in (1, 2, 3, 4, 8, 12, 16, 32, 64)] == [16, 16, 8, 8, 4, 2, 2, 1, 1]


def test_no_graphs_where_a_batch_step_waits_for_the_host(tmp_path):
    path, _ = write_checkpoint(tmp_path / "m", "moe")
    assert BatchDecoder(load_model(path, "cuda", torch.float32), 4096, 512).graphs is None


@pytest.mark.parametrize("late", [None, 5])
def test_graphs_in_bf16_with_the_kernel_equal_the_eager_batch(tmp_path, late):
    """bf16 MoE with head size 64 (the Triton kernel, the grouped expert GEMMs; the weights fused as
    `ernie serve` loads them on CUDA, shared experts in the stack): the graphs, captured
    at start-up by warm(), give the eager engine's tokens, and logprobs within bf16's rounding (the
    padded products may sum in another order); late: a sequence joins after five steps."""
    path, _ = write_checkpoint(tmp_path / "m", "moe", head_dim=64)
    model = prepare_for_decoding(load_model(path, "cuda", torch.bfloat16), "graph")
    graph_engine, eager_engine = BatchDecoder(model, 4096, 512), BatchDecoder(model, 4096, 512, graphs=False)
    assert graph_engine.warm(3) == 3 and set(graph_engine.graphs.graphs) == {1, 2, 4}
    graph_tokens, graph_lps = _run(graph_engine, PROMPTS, LENGTHS, late)
    eager_tokens, eager_lps = _run(eager_engine, PROMPTS, LENGTHS, late)
    assert not graph_engine.graphs.failed
    assert graph_tokens == eager_tokens
    assert max(abs(a - b) for g, e in zip(graph_lps, eager_lps) for a, b in zip(g, e)) < 5e-2
