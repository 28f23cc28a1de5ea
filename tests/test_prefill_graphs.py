"""The prompt's forward padded to a fixed length (generate.PrefillGraphs), against transformers.

On the CPU the padded forward runs eagerly (capture=False): the same code the CUDA graph replays,
minus the capture. The CUDA tests compare the replayed graph with the eager prefill on the GPU.
"""

import pytest
import torch

from ernie_cli.runtime.decoder import Decoder, PrefillGraphs, prefill_waits_for_host, prompt_graphs
from ernie_cli.runtime.generate import generate
from ernie_cli.runtime.sampling import Sampler, SamplingParams
from ernie_cli.weights.loader import load_model

TOL = 1e-4


def _prompt(n, seed=3):
    return torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ["dense", "moe", "moe_interval2"])
@pytest.mark.parametrize("n", [1, 9, 32, 33])
def test_padded_prefill_logits_match_transformers(checkpoints, shape, n):
    """The last real token's logits, with the prompt padded to the next length (32 or 64 here): the
    padding after it must change nothing. n=32 needs none; n=33 pads 31 tokens."""
    path, ref = checkpoints(shape)
    model = load_model(path, "cpu", torch.float32)
    graphs = PrefillGraphs(model, capture=False)
    ids = _prompt(n)
    with torch.no_grad():
        expected = ref(ids).logits[:, -1]
        got = graphs(ids, model.new_cache(1, graphs.length_for(n)))
    assert graphs.length_for(n) == (32 if n <= 32 else 64)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


def test_padding_reaches_the_cache(checkpoints):
    """The padded tokens do run (their keys fill cache slots past the prompt), so the tests above
    and below would see it if they leaked into the prompt's results."""
    path, _ = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        PrefillGraphs(model, capture=False)(_prompt(9), cache)
    k = cache.layers[0].k
    assert k[:, :, 9:32].abs().sum() > 0 and k[:, :, 32:].abs().sum() == 0


@pytest.mark.parametrize("graph_step", [False, True])
@pytest.mark.parametrize("shape", ["moe", "dense"])
def test_greedy_after_padded_prefill_identical_to_transformers(checkpoints, shape, graph_step):
    """32 greedy tokens after a padded prefill, decoded through the cache that holds the padding's
    keys past the prompt: eagerly (which reads the filled part) and through the decoder's step, the code the
    CUDA graph runs (which attends over the whole buffer, masking what is past the position)."""
    path, ref = checkpoints(shape)
    ids = _prompt(9, seed=11)
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, repetition_penalty=1.5,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, ids.shape[1]:].tolist()
    model = load_model(path, "cpu", torch.float32)
    decoder = Decoder(model, prefill_graphs=PrefillGraphs(model, capture=False))
    if graph_step:  # the step uncompiled: the graph's code, run eagerly
        decoder.mode, decoder.pos = "compile", torch.zeros(1, dtype=torch.long)
        decoder.step = decoder._step
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), model.config.vocab_size, model.device)
    got = [s.token for s in generate(model, ids[0].tolist(), 32, sampler, decoder=decoder)]
    assert got == expected
    assert len(set(expected)) > 8


def test_longer_prompts_and_later_chunks_run_eagerly(checkpoints, monkeypatch):
    """Only a prompt from position 0 that fits the longest length is padded; the rest is the plain
    forward (whose parity tests are in test_model_parity.py)."""
    path, ref = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    graphs = PrefillGraphs(model, capture=False)
    graphs.LENGTHS = (32,)
    decoder = Decoder(model, prefill_graphs=graphs)
    ids = _prompt(40)
    calls = []
    monkeypatch.setattr(PrefillGraphs, "__call__", lambda *a: calls.append(a))  # must not be reached
    with torch.no_grad():
        got = decoder.prefill(ids)
        assert (got - ref(ids).logits[:, -1]).abs().max().item() < TOL
        decoder.prefill(ids[:, 30:], 30)
    assert calls == []


def test_a_failed_capture_falls_back_to_the_eager_prefill(checkpoints, monkeypatch, capsys):
    """Should a capture fail on some GPU (an operation that waits for the host), the prompt still
    gets transformers' logits, a one-line warning goes to stderr, and later prompts run eagerly."""
    path, ref = checkpoints("moe")
    model = load_model(path, "cpu", torch.float32)
    graphs = PrefillGraphs(model, capture=False)
    graphs.capture = True  # as on CUDA, with a capture that fails

    def fail(n, cache):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphs, "_capture", fail)
    monkeypatch.delenv("ERNIE_DEBUG", raising=False)
    decoder = Decoder(model, prefill_graphs=graphs)
    ids = _prompt(9)
    with torch.no_grad():
        got = decoder.prefill(ids)
        assert (got - ref(ids).logits[:, -1]).abs().max().item() < TOL
    err = capsys.readouterr().err
    assert "could not be captured" in err and "stream is capturing" in err and "more detail" not in err
    assert graphs.failed and graphs.graphs == {}
    monkeypatch.setenv("ERNIE_DEBUG", "1")
    graphs.failed = False
    with pytest.raises(RuntimeError):
        decoder.prefill(ids)


def test_what_waits_for_the_host(checkpoints):
    """The CPU's expert loop reads group sizes back (run_grouped), so a MoE prefill there could not
    be a graph; a dense model has no such step."""
    moe = load_model(checkpoints("moe")[0], "cpu", torch.float32)
    dense = load_model(checkpoints("dense")[0], "cpu", torch.float32)
    assert prefill_waits_for_host(moe) and not prefill_waits_for_host(dense)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="needs a Hopper GPU (torch's grouped GEMM without a host sync)")


@hopper
@pytest.mark.parametrize("shape, dtype", [("dense", torch.float32), ("moe", torch.bfloat16)])
def test_replayed_prefill_matches_the_eager_prefill_on_the_gpu(checkpoints, shape, dtype):
    """The CUDA graph against the eager padded forward it captured, for lengths that share a graph
    and after the cache was replaced (a recapture): the same kernels on the same inputs, so equal
    but for the run-to-run order of a GEMM's sums (1e-5 of the logits' scale in float32, 2^-7 in
    bf16, the same top token); and float32 within 1e-4 of transformers. float32 experts take one GEMM per expert, which reads
    the group sizes back, so the MoE runs in bf16 (the grouped GEMMs)."""
    path, ref = checkpoints(shape)
    model = load_model(path, "cuda", dtype)
    assert not prefill_waits_for_host(model)
    graphs = PrefillGraphs(model)
    eager = PrefillGraphs(model, capture=False)
    cache = model.new_cache(1, 128)
    for n in (9, 20, 32, 33, 100):
        ids = _prompt(n, seed=n).cuda()
        got = graphs(ids, cache)
        want = eager(ids, cache)
        _assert_same(got, want, dtype, n)
        if dtype == torch.float32:
            with torch.no_grad():
                assert (got.cpu() - ref(ids.cpu()).logits[:, -1]).abs().max().item() < TOL
    assert sorted(graphs.graphs) == [32, 64, 128]
    cache = model.new_cache(1, 4096)  # a new cache: the graphs must be captured again against it
    ids = _prompt(9).cuda()
    _assert_same(graphs(ids, cache), eager(ids, cache), dtype, 9)
    assert sorted(graphs.graphs) == [32] and graphs._cache() is cache


def _assert_same(got, want, dtype, n):
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2.0**-7) * scale, n
    assert torch.equal(got.argmax(-1), want.argmax(-1)), n


@cuda
def test_float32_experts_keep_the_eager_prefill_on_the_gpu(checkpoints):
    model = load_model(checkpoints("moe")[0], "cuda", torch.float32)
    assert prefill_waits_for_host(model)
    assert Decoder(model, "compile").prefill_graphs is None


@hopper
@pytest.mark.parametrize("mode", ["compile", "graph"])
def test_generation_with_prefill_graphs_on_the_gpu(checkpoints, mode):
    """float32 on the GPU, a prefill graph, then the decode step compiled (Inductor) or captured
    from the eager code with the prompt graphs beside it (as `ernie bench` runs it): the same 32
    greedy tokens as transformers."""
    path, ref = checkpoints("dense")
    ids = _prompt(9, seed=11)
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, repetition_penalty=1.5,
                           eos_token_id=None, pad_token_id=0)
    model = load_model(path, "cuda", torch.float32)
    decoder = Decoder(model, mode, prompt_graphs(model) if mode == "graph" else None)
    assert decoder.prefill_graphs is not None
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), model.config.vocab_size, model.device)
    got = [s.token for s in generate(model, ids[0].tolist(), 32, sampler, decoder=decoder)]
    assert got == out[0, ids.shape[1]:].tolist()
    assert 32 in decoder.prefill_graphs.graphs
